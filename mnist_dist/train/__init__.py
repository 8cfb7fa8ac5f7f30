"""Training: a run of N >= 1 members (a single run is a pack of one) from its starting point to its
last epoch.

run (the phase loop) -> schedule (what is left to train) and run_state (each member's history,
run.json, tracker; the checkpoint's progress; console prints) -> engine (evaluate, fit, the step;
its Accelerator made by accelerator.py, the one importer of Accelerate) -> model, member_linear,
member_optimizer (its rules: member_steps), member_scaler, cuda_graphs; data (MNIST in memory,
sharded batches), stopping (signals, Preempted), threads (CPU threads of the allocation).

`python -m mnist_dist.train` and `accelerate launch -m mnist_dist.train` run __main__.py.

May import: config, errors, store, track and train. Never sweep, slurm or cli (__main__ aside, which
is the command line's `train`).
"""
