"""Web search: what to search for, the search provider, and the pages behind its results."""
