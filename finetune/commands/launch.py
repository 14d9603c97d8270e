"""`finetune launch --nproc-per-node N --recipe R.yaml`: a DeepSpeed run through DeepSpeed's own launcher."""
from __future__ import annotations

import os
import subprocess
import sys

from ..errors import UserError
from .common import parser


def main(argv: list[str]) -> int:
    p = parser("finetune launch", "Start a DeepSpeed run on this machine or several (DeepSpeed's launcher).")
    p.add_argument("--nproc-per-node", type=int, required=True, help="ranks (GPUs) per machine")
    p.add_argument("--recipe", required=True)
    p.add_argument("--hostfile", help="DeepSpeed hostfile for several machines (lines: host slots=N)")
    p.add_argument("--num-nodes", type=int)
    p.add_argument("--master-addr")
    p.add_argument("--master-port", type=int)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides before or after the flags
    problems = [f"{flag} must be >= 1, got {value}" for flag, value in
                (("--nproc-per-node", args.nproc_per_node), ("--num-nodes", args.num_nodes))
                if value is not None and value < 1]
    if args.hostfile is not None and not os.path.isfile(args.hostfile):
        problems.append(f"--hostfile {args.hostfile}: no such file")
    if (args.num_nodes or 1) > 1 and args.hostfile is None:
        problems.append("--num-nodes > 1 needs --hostfile (the machines and their slots)")
    if problems:
        raise UserError("finetune launch: " + "; ".join(problems))
    from ..recipe import RecipeError, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # fail here, not in N processes
    if recipe.distributed.backend != "deepspeed":
        raise RecipeError(f"{args.recipe}: distributed.backend is {recipe.distributed.backend!r}; launch needs "
                          f"deepspeed (override with distributed.backend=deepspeed)")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc_per_node)]
    for flag, value in (("--hostfile", args.hostfile), ("--num_nodes", args.num_nodes),
                        ("--master_addr", args.master_addr), ("--master_port", args.master_port)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--module", "finetune", "--recipe", args.recipe, *args.overrides]
    print("launching: " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)
