"""State shared by gateway replicas and workers: the Redis client."""
