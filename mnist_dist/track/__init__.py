"""Experiment trackers: W&B and TensorBoard through Accelerate's trackers (trackers), the W&B mode and
reachability check, and the reader of a .wandb file (wandb_file).

May import: config, errors, store and track.
"""
