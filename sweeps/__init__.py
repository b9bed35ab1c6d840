"""Ray Tune / Optuna sweeps over LoRA trainings: spec, tuner, trainable, results."""
