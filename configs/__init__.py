"""Hydra configuration tree, packaged so that installed entry points find it as `pkg://configs`."""
