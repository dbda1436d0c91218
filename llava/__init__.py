"""LLaVA model library: torch + transformers only."""
