"""The toy world: procedurally drawn coloured shapes, their captions, and an exact pixel oracle.

A leaf package: it imports neither `trainer/` nor `evaluator/`; both (and `sweeps/`) use it.
The world has a known right answer for a LoRA task: one colour (`HELD_OUT_COLOR`) is left out
of the built-in SD model's pretraining, and a LoRA must bind it to a trigger word.
"""
