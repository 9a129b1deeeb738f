"""HTTP routes, one module per surface; each handler is thin."""
