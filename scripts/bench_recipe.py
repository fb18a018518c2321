"""Where a meta-training recipe's time goes: its compiled PES truncation, member by member.

For each family of an experiment's task mixture (``configs/experiment/<name>.yaml``, default
``ortho_long_mixture``, the shipped default's recipe), one task is drawn and the truncation that
PES runs on it is timed: ``unroll(..., compile=True)`` under ``torch.no_grad``, per-member
meta-parameters (the shipped checkpoint's, perturbed), ``--population`` members, ``--steps``
inner steps. Reported per member: parameters, the first call's time (compilation; Inductor
reuses graphs it has on disk, so for the time from scratch point ``TORCHINDUCTOR_CACHE_DIR`` at
an empty directory), and the median of ``--repeats`` calls per inner step; then the mean over
the mixture weighted as the recipe draws its members.

    python scripts/bench_recipe.py --threads 2
    python scripts/bench_recipe.py --experiment ortho_long_mixture --population 32 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
from l2o.meta.unroll import init_carry, unroll

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "experiment"


def time_member(task, lopt, meta, population: int, steps: int, repeats: int):
    """(first call's seconds, median seconds per inner step) of the compiled PES truncation."""
    g = torch.Generator().manual_seed(0)
    stacked = {
        k: v + 0.01 * torch.randn((population, *v.shape), generator=g) for k, v in meta.items()
    }
    with torch.no_grad():
        carry = init_carry(lopt.rule(meta), task, torch.arange(population))

        def truncation() -> float:
            start = time.perf_counter()
            unroll(lopt.rule, task, carry, steps, population_meta_params=stacked, compile=True)
            return time.perf_counter() - start

        first = truncation()
        return first, statistics.median(truncation() for _ in range(repeats)) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="ortho_long_mixture")
    parser.add_argument("--checkpoint", default="default", help="the learned optimizer inside")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="K, inner steps per truncation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = CONFIGS / f"{args.experiment}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        parser.error(f"no experiment {args.experiment!r}; known: {', '.join(known)}")
    task_config = OmegaConf.load(path).get("task", {})
    if "families" not in task_config:
        parser.error(f"experiment {args.experiment!r} is not a task mixture (no task.families)")
    families = [instantiate(family) for family in task_config.families]
    weights = list(task_config.get("weights") or [1.0] * len(families))
    lopt, meta, _ = load_checkpoint(resolve_checkpoint(args.checkpoint))
    print(
        f"{args.experiment}: compiled PES truncations, P={args.population}, K={args.steps}, "
        f"{args.checkpoint} inside; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| member | weight | parameters | first call (s) | ms / inner step |")
    print("|---|---:|---:|---:|---:|")
    per_step = []
    for index, (family, weight) in enumerate(zip(families, weights, strict=True)):
        task = family.sample(0)
        size = sum(v.numel() for v in task.init_from_seed(0).values())
        first, seconds = time_member(task, lopt, meta, args.population, args.steps, args.repeats)
        per_step.append(seconds)
        print(
            f"| {index}: {type(task).__name__} | {weight:g} | {size:,} | {first:.0f} | "
            f"{seconds * 1e3:.2f} |",
            flush=True,
        )
    mean = sum(w * s for w, s in zip(weights, per_step)) / sum(weights)
    print(f"\nweighted by the mixture: {mean * 1e3:.2f} ms an inner step")


if __name__ == "__main__":
    main()
