"""Retire-Cluster main node."""
