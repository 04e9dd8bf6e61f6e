"""Generation: logits processing and sampling, and the KV-cached decoding loop with streaming."""
