"""Inner task-steps per second of a meta-training unroll: vmapped population vs a Python loop.

One task (an MLP classifier on digits), one learned optimizer (the MLP lopt); a population of P
instances trained for K inner steps

* vmapped: ``l2o.meta.unroll.unroll`` — all P instances in one ``torch.func.vmap`` per step;
* loop:    the same arithmetic one instance at a time in a Python loop (``grad_and_value`` and
           ``rule.update`` per instance and step), the naive way to train a population.

in two modes: ``forward`` (no meta-gradient, as ES/PES run) and ``tbptt`` (forward + backward to
the meta-parameters, as truncated BPTT runs). The loop's rate does not depend on P, so it is
measured on at most ``--loop-cap`` instances. Prints a markdown table.

    python scripts/bench_meta_train.py              # P = 1, 64, 512; CPU and CUDA if present
    python scripts/bench_meta_train.py --quick      # P = 1, 8, 64; fewer repeats
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import grad_and_value

from l2o.learned import get_lopt
from l2o.meta.losses import get_meta_loss
from l2o.meta.unroll import init_carry, unroll
from l2o.optim.base import apply_updates
from l2o.tasks.registry import get_task


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _meta(lopt, device, grad: bool):
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    return {k: v.to(device).requires_grad_(grad) for k, v in meta.items()}


def vmapped_truncation(lopt, task, seeds, steps, device, grad: bool) -> None:
    meta = _meta(lopt, device, grad)
    rule = lopt.rule(meta)
    with torch.no_grad():
        carry = init_carry(rule, task, seeds, device=device)
    with torch.set_grad_enabled(grad):
        result = unroll(rule, task, carry, steps)
        if grad:
            loss = get_meta_loss("train_mean")(result.terms).mean()
            torch.autograd.grad(loss, list(meta.values()))


def loop_truncation(lopt, task, seeds, steps, device, grad: bool) -> None:
    meta = _meta(lopt, device, grad)
    rule = lopt.rule(meta)
    total = 0.0
    with torch.set_grad_enabled(grad):
        for seed in seeds.tolist():
            params = {k: v.to(device) for k, v in task.init_from_seed(seed).items()}
            state = rule.init(params)
            for step in range(steps):
                batch = task.batch(seed, step)
                grads, loss = grad_and_value(task.loss)(params, batch)
                updates, state = rule.update(grads, state, params, step=step)
                params = apply_updates(params, updates)
                total = total + loss
        if grad:
            torch.autograd.grad(total / len(seeds), list(meta.values()))


def rate(fn, population: int, steps: int, repeats: int, device: torch.device, **kw) -> float:
    """Inner task-steps per second of ``fn`` (one warm-up call, then ``repeats`` timed)."""
    seeds = torch.arange(population, dtype=torch.int64)
    fn(seeds=seeds, steps=steps, device=device, **kw)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(seeds=seeds, steps=steps, device=device, **kw)
    _sync(device)
    return population * steps * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="P = 1, 8, 64 and fewer repeats")
    parser.add_argument("--populations", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=10, help="K, inner steps per truncation")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--loop-cap", type=int, default=32, help="instances the loop times")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu [cuda]")
    parser.add_argument("--modes", nargs="+", default=["forward", "tbptt"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()

    populations = args.populations or ([1, 8, 64] if args.quick else [1, 64, 512])
    repeats = args.repeats or (1 if args.quick else 3)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.threads:
        torch.set_num_threads(args.threads)

    lopt = get_lopt("mlp")
    print(
        f"task: MLP classifier on digits (width 32, depth 2, batch 32); lopt: mlp "
        f"(hidden 32x32); K={args.steps} steps; torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads\n"
    )
    print("| device | mode | P | vmapped steps/s | loop steps/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        task = get_task("mlp", dataset="digits", width=32, depth=2, batch_size=32).to(device)
        for mode in args.modes:
            grad = mode == "tbptt"
            kw = dict(lopt=lopt, task=task, grad=grad)
            for population in populations:
                loop_population = min(args.loop_cap, population)
                loop = rate(loop_truncation, loop_population, args.steps, repeats, device, **kw)
                vmapped = rate(vmapped_truncation, population, args.steps, repeats, device, **kw)
                print(
                    f"| {label} | {mode} | {population} | {vmapped:,.0f} | {loop:,.0f} | "
                    f"{vmapped / loop:.1f}x |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
