"""Assemble vision encoder + projector + language model as a transformers `LlavaForConditionalGeneration`."""
