"""Model workers: the built-in local engine, the vLLM launcher, and what they share."""
