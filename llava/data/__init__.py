"""LLaVA records to model inputs: templates, label masks, images, collation, synthetic data."""
