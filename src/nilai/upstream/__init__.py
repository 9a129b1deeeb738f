"""Talking to model servers: the pooled HTTP client and SSE framing."""
