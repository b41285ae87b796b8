"""Cluster tier: tests against a real control plane (fixtures in tests/conftest.py)."""
