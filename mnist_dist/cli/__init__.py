"""The `mnist-dist` command line (Typer): the app and its entry point (app), the commands that train
and read runs (train), SLURM jobs (jobs), sweeps (sweep), the training options they share (options),
and how a command ends (exits). Start-up stays light: torch is imported by the commands that train
or evaluate, never by `mnist-dist --help`.

May import: everything (config, errors, store, track, train, slurm, sweep, cli).
"""

from mnist_dist.cli.app import app, main

__all__ = ["app", "main"]
