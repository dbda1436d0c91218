"""Inference: batched and streaming generation shared by evaluation and serving."""
