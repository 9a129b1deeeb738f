"""NilRAG: retrieval over documents secret-shared to nilDB nodes (nilrag 0.1.11's protocol)."""
