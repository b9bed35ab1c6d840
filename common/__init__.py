"""Small helpers that trainer/, evaluator/ and sweeps/ share: files, the cache folder, YAML, --set.

Leaf package: imports nothing from the project, nothing heavy (no torch, Ray or W&B).
"""
