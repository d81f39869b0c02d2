"""Emulated-core cost: placeholder, filled in below."""
