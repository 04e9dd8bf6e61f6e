"""Interoperability with other toolkits' formats (Hugging Face GPT-2 and BERT checkpoints, in and out)."""
