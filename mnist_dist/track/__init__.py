"""Experiment trackers: W&B through Accelerate's tracker, and TensorBoard (trackers), the W&B mode and
reachability check, a run's TensorBoard run and HParams session (tensorboard), and the reader of a
.wandb file (wandb_file).

May import: config, errors, store and track.
"""
