"""Foundations every layer may use: params (config), safe YAML, hashing, offline switches, atomic files."""
