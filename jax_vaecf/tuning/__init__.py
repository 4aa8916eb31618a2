"""Hyper-parameter search on validation data (Optuna)."""
