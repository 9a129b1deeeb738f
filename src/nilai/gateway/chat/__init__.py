"""The chat request pipeline: validate → relay → sign (auth runs as a dependency before it)."""
