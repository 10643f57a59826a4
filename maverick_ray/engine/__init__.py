"""Expert-parallel inference engine: rank workers, lockstep steps, continuous batching."""
