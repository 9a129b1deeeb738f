"""NilRAG: retrieval over secret-shared documents in nilDB."""
