"""Accounting off the request path: query logs are queued and written in batches."""
