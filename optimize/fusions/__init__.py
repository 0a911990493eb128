"""Rewrite rules for onnxruntime, one per file (pattern / check / rewrite)."""
