"""Control plane of llava-platform: CLI, configuration, storage, tracking, registry, serving."""
