"""Fuzzing helpers: random transformer-shaped graphs and mutations of serialized models."""
