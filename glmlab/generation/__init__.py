"""Generation: settings, logits processors, the batched KV-cache engine, beam search, streaming text."""
