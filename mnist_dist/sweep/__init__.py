"""Sweeps: the spec and its members (spec), the sweep directory's layout (layout), which members pack
together (packing), training them here in pack processes (local), the results table (results), a
sweep as one SLURM job array (array), and TensorBoard on a sweep (board).

May import: config, errors, store, track, train, slurm and sweep.
"""
