"""Kiln's Python client and user CLI: talks to a Kiln server over its JSON API (no torch, no Flask)."""
