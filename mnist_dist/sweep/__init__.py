"""Sweeps: the spec and its members (spec), the sweep directory's layout (layout), which members pack
together (packing), training them here in pack processes (local), the results table (results), and a
sweep as one SLURM job array (array).

May import: config, errors, store, track, train, slurm and sweep.
"""
