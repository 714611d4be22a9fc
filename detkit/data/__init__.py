"""Data sets, transforms and batching."""
