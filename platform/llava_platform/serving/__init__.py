"""Ray Serve application: OpenAI-compatible chat completions for LLaVA models."""
