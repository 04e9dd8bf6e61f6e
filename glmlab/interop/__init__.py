"""Interoperability with other toolkits' formats (Hugging Face GPT-2 checkpoints)."""
