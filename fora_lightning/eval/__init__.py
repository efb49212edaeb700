"""Evaluation: exact-match generation metrics and report callbacks."""
