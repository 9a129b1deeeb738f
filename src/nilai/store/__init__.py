"""Storage: accounts, API keys, query logs and usage totals (PostgreSQL or SQLite)."""
