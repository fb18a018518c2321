"""Guarded training-step cost on a small GPT-style character LM, ratios measured in one run.

Each contender trains the same ``CharTransformerTask`` (stdlib-source text, on every machine)
from the same initialisation; one timed step is ``opt.step(closure)`` with the forward and
backward pass in the closure. Contenders: torch AdamW, the unguarded ``LearnedOptimizer``, and
``GuardedLearnedOptimizer`` three ways:

- ``candidates``: LGL2O as published, the closure evaluated at both candidates (3 forward and
  backward passes per step);
- ``candidates + forward-only guard_closure``: the same comparison on the same batch through
  a closure without backward (1 forward-backward + 2 forwards);
- ``deferred``: each comparison made on the next step's closure (2 forward-backward passes);
- ``deferred, compare_every=2``: the same, comparing on every other step (1.5 on average);
- ``deferred + shadow``: the deferred guard with its fallback-alone shadow run (``shadow=True``,
  3 forward-backward passes and a second Adam step).

Rounds are interleaved and the median step time taken. Also reported: each guarded variant's
held-out loss (the corpus's eval split) at the end, next to the unguarded one's.

    python scripts/bench_guard.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import l2o
from l2o.tasks.language import CharTransformerTask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _contenders(device: torch.device) -> dict[str, tuple[Callable, bool]]:
    """name -> (optimizer factory, whether its step also gets a forward-only guard closure)."""
    adamw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return {
        "torch AdamW": (lambda p: torch.optim.AdamW(p, lr=1e-3, **adamw), False),
        "learned": (lambda p: l2o.LearnedOptimizer(p), False),
        "guarded, candidates": (lambda p: l2o.GuardedLearnedOptimizer(p), False),
        "guarded, candidates + forward-only guard_closure": (
            lambda p: l2o.GuardedLearnedOptimizer(p),
            True,
        ),
        "guarded, deferred": (lambda p: l2o.GuardedLearnedOptimizer(p, deferred=True), False),
        "guarded, deferred, compare_every=2": (
            lambda p: l2o.GuardedLearnedOptimizer(p, deferred=True, compare_every=2),
            False,
        ),
        "guarded, deferred + shadow": (
            lambda p: l2o.GuardedLearnedOptimizer(p, deferred=True, shadow=True),
            False,
        ),
    }


class Run:
    """One contender training its own copy of the model on the shared batch sequence."""

    def __init__(self, task: CharTransformerTask, make: Callable, forward_only: bool) -> None:
        self.task = task
        init = task.init(torch.Generator().manual_seed(0))
        self.params = {k: nn.Parameter(v) for k, v in init.items()}
        self.opt = make(list(self.params.values()))
        self.forward_only = forward_only
        self.batch_index = 0
        self.times: list[float] = []

    def step(self) -> float:
        batch = self.task.batch(0, self.batch_index)
        self.batch_index += 1

        def closure():
            self.opt.zero_grad()
            loss = self.task.loss(self.params, batch)
            loss.backward()
            return loss

        if self.forward_only:
            loss = self.opt.step(closure, guard_closure=lambda: self.task.loss(self.params, batch))
        else:
            loss = self.opt.step(closure)
        return float(loss.detach())

    def final_loss(self, batches: int = 8) -> float:
        if isinstance(self.opt, l2o.GuardedLearnedOptimizer):
            batch = self.task.batch(0, self.batch_index)

            def closure():
                self.opt.zero_grad()
                loss = self.task.loss(self.params, batch)
                loss.backward()
                return loss

            self.opt.settle(closure)
        with torch.no_grad():
            batches_ = (self.task.batch(0, i, split="eval") for i in range(batches))
            losses = [self.task.loss(self.params, b) for b in batches_]
        return float(torch.stack(losses).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=6)  # even: compare_every=2 evens out
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    task = CharTransformerTask(
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=args.layers,
        seq_len=args.seq_len,
        batch_size=args.batch,
    ).to(device)
    runs = {name: Run(task, make, fo) for name, (make, fo) in _contenders(device).items()}
    n = sum(p.numel() for p in next(iter(runs.values())).params.values())
    for run in runs.values():  # warm-up
        run.step()
    for _ in range(args.rounds):
        for run in runs.values():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            _sync(device)
            run.times.append((time.perf_counter() - start) / args.steps)
    steps = 1 + args.rounds * args.steps
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{device} ({label}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"char Transformer LM, {n:,} parameters, batch {args.batch} x {args.seq_len}"
    )
    print(f"\n| optimizer | ms / step | ratio to learned | held-out loss after {steps} steps |")
    print("|---|---:|---:|---:|")
    base = statistics.median(runs["learned"].times)
    for name, run in runs.items():
        median = statistics.median(run.times)
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.2f} | {run.final_loss():.3f} |")


if __name__ == "__main__":
    main()
