"""What a run leaves on disk and reads back: the run directory's files (outputs), checkpoints, the
writer lock and private folders (ownership), atomic writes, machine faults as one WriteFault, the MNIST
files (datafiles), provenance and plots.

May import: config, errors and store. Never train, track, sweep, slurm or cli: whatever writes, it
writes through these.
"""
