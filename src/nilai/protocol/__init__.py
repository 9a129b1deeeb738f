"""Wire types: what clients and model servers send and receive. No I/O here."""
