"""Billing: per-model prices and the cost of a request, in integer micro-units."""
