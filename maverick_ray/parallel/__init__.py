"""Expert placement and dispatchers that move routed rows between expert-parallel ranks."""
