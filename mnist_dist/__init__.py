"""mnist-dist: the classic MNIST feed-forward tutorial as a toolkit that runs unchanged on a laptop CPU,
one or many GPUs, many nodes and SLURM clusters.

The folders are its layers; data flows one way, each importing only those after it:

    cli -> sweep -> slurm -> train -> track -> store       (config and errors: used by all)

Importing the package is cheap on purpose (no torch): the CLI's start-up depends on it.
"""

__version__ = "0.1.0"
