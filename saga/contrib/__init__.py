"""Integrations of saga with frameworks (each an optional extra)."""
