"""Training pieces: optimizer and schedule, DeepSpeed config, batching and packing, checkpoint state."""
