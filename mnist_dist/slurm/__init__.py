"""SLURM through submitit: options, preflight, sbatch and the requeued TrainJob (submit); status, logs,
cancel and the history of submitted jobs, from squeue, scontrol and submitit's files (jobs).

May import: config, errors, store, track, train and slurm.
"""
