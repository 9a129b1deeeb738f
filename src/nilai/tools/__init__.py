"""Server-side tools: what the gateway runs itself when a model calls a tool it implements."""
