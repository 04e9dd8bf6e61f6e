"""Data pipeline: corpus reading and splits, tokenizers, token datasets."""
