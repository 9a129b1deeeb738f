"""Private context added to a chat before it is routed: system prompts kept in nilDB.

Lower layer: nothing here imports the gateway. Each external service sits behind a small
Protocol with the real adapter (HTTP) and an in-memory twin for tests.
"""
