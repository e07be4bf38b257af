"""Decoding with a draft: speculative decoding, draft-guided decoding, baselines (Power Sampling, DoLa),
batched generation."""
