"""Scripts that make the project's own pretrained weights. Nothing in trainer/, evaluator/ or
sweeps/ imports this package: it sits above trainer/ (it uses its model builder)."""
