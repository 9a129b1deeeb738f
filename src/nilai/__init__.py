"""nilai: a confidential LLM serving gateway with signed answers."""

__version__ = "0.2.0.dev0"
