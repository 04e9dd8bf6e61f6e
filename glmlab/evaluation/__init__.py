"""Evaluation: likelihood metrics (NLL, perplexity, bits per character and per byte)."""
