"""Necks: modules that map backbone features to features (feature pyramids)."""
