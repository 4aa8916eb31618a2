"""Ranking metrics, per-user records and significance tests."""
