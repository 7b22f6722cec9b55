r"""An sbatch script that runs one lobass point on several GPUs: torchrun inside the SLURM job.

run: python scripts/slurm_torchrun.py --nodes 1 --gpus-per-node 8 --partition gpu -- \
         experiment=paper_alpaca_llama13b data.path=/shared/alpaca_data.json > job.sbatch
     sbatch job.sbatch                       (or add --submit to call sbatch directly)

``hydra/launcher=submitit_slurm`` sends each sweep point to its own one-GPU job, and lobass reads
torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE), not SLURM's. For a point that needs several
GPUs (the 52k-row reference, FSDP or ZeRO-3 for 13B on small cards), SLURM starts one task per
node, and that task's ``torchrun`` starts one process per GPU. The ranks meet through torchrun's
c10d rendezvous on the job's first node (``--rdzv-id`` is the SLURM job id: the nodes of this
job, and only they, form the group), and every rank writes into one Hydra run directory named by
the job id (each rank composes the config itself; the default directory has the launch second
in it, which can differ between ranks).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

RDZV_PORT = 29500


@dataclass
class SlurmJob:
    """What the sbatch header asks SLURM for."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_gpu: int = 8  # data loading and tokenisation per rank
    mem_gb: int = 0  # host RAM per node; 0 = the partition's default
    time_min: int = 1440
    partition: str | None = None
    account: str | None = None
    name: str = "lobass"
    python: str = ".venv/bin/python"
    setup: list[str] = field(default_factory=list)  # e.g. ["module load cuda/12.4"]


def sbatch_script(job: SlurmJob, overrides: list[str]) -> str:
    """The sbatch script: one task per node, ``torchrun`` with one process per GPU inside it.

    Args:
        job: the allocation.
        overrides: Hydra overrides for ``run.py``, passed through shell-quoted.

    Raises:
        ValueError: a non-positive node or GPU count.

    """
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise ValueError(f"--nodes and --gpus-per-node must be >= 1; got {job.nodes}, "
                         f"{job.gpus_per_node}")
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",  # torchrun starts the per-GPU processes itself
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --cpus-per-task={job.cpus_per_gpu * job.gpus_per_node}",
        f"#SBATCH --time={job.time_min}",
        "#SBATCH --output=slurm-%j.out",
        "#SBATCH --requeue",  # training resumes from its last checkpoint after a requeue
    ]
    header += [f"#SBATCH --mem={job.mem_gb}G"] if job.mem_gb else []
    header += [f"#SBATCH --partition={job.partition}"] if job.partition else []
    header += [f"#SBATCH --account={job.account}"] if job.account else []
    torchrun = [
        f"srun --ntasks-per-node=1 {job.python} -m torch.distributed.run",
        f'--nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={job.gpus_per_node}',
        f'--rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head:{RDZV_PORT}"',
        " ".join(["run.py", *map(shlex.quote, overrides)]),
        '"hydra.run.dir=outputs/slurm-$SLURM_JOB_ID"',
    ]
    body = [
        "set -euo pipefail",
        *job.setup,
        '# the first node hosts the rendezvous; every node\'s torchrun joins it',
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export OMP_NUM_THREADS={job.cpus_per_gpu}",
        " \\\n  ".join(torchrun),
    ]
    return "\n".join(header + [""] + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print (or submit) the sbatch script for the overrides after ``--``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--cpus-per-gpu", type=int, default=8)
    parser.add_argument("--mem-gb", type=int, default=0)
    parser.add_argument("--time-min", type=int, default=1440)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--setup", action="append", default=[], help="a shell line before srun")
    parser.add_argument("--submit", action="store_true", help="pipe the script to sbatch")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for run.py (after --)")
    args = parser.parse_args(argv)
    job = SlurmJob(args.nodes, args.gpus_per_node, args.cpus_per_gpu, args.mem_gb,
                   args.time_min, args.partition, args.account, setup=args.setup)
    script = sbatch_script(job, args.overrides)
    if args.submit:
        return subprocess.run(["sbatch"], input=script, text=True).returncode
    sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
