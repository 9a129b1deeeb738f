"""Rate limits and concurrency slots, in Redis (shared by replicas) or in memory."""
