"""The entry point: train the tutorial's MNIST model (the run itself is mnist_dist/run.py).

One process, CPU or the GPU (Accelerate picks CUDA when there is one):

    python -m mnist_dist.train --config configs/seed.yaml --output-dir runs/seed
    mnist-dist train                                   # the same, on the embedded defaults

Several processes on one machine (2 gloo processes on a CPU-only machine, one per GPU otherwise):

    accelerate launch --config_file launch/cpu-2proc.yaml -m mnist_dist.train --output-dir runs/cpu2
    accelerate launch --multi_gpu --num_processes 2 -m mnist_dist.train --output-dir runs/cpu2
    accelerate launch --config_file launch/multi-gpu.yaml -m mnist_dist.train --output-dir runs/gpus

Two nodes, 8 GPUs each (run on every node, with its --machine_rank):

    accelerate launch --config_file launch/multi-node.yaml --machine_rank 0 \\
        --main_process_ip HEAD_NODE -m mnist_dist.train --output-dir /shared/runs/nodes

`batch_size` is the global batch: with N processes each takes a contiguous 1/N of every batch, so the
history is the same for any N (within float rounding). On SLURM: `mnist-dist submit --partition gpu`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """`python -m mnist_dist.train ARGS` = `mnist-dist train ARGS` (one set of options, in cli.py)."""
    from mnist_dist.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
