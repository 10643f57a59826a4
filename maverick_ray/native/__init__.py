"""Optional native CPU kernels, compiled from C on first use (see build.py)."""
