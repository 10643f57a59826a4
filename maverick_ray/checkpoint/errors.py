"""Errors for unusable checkpoints: every message names the tensor and the file involved."""


class CheckpointError(ValueError):
    """A checkpoint file, index or tensor is missing, unreadable or of the wrong shape."""
