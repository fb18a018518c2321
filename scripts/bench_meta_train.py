"""Inner task-steps per second of meta-training unrolls, every ratio measured in one run.

Configuration (the performance issue's): an MLP 40-32-32-10 on MNIST-1D, batch 64, truncation
K=20, a shipped learned optimizer inside (``--checkpoint``: ``mlp_2x32``, the default until
2026-12-02 and this script's default, so that its figures compare with the earlier ones; or
``default``, the ``ortho_mlp`` checkpoint meta-training now runs), populations P. Paths:

* ``forward``: ``l2o.meta.unroll.unroll`` as ES/PES run it (per-member meta-parameters, no
  autograd), eager;
* ``forward, compiled``: the same with ``compile=True`` (the truncation as one ``torch.compile``d
  scan over its steps; compilation happens in the warm-up and is reported separately);
* ``forward, compiled per step``: the compiled path before the scan, one compiled graph per
  inner step called from a Python loop (for the ratio between the two);
* ``tbptt``: the eager unroll with autograd to the meta-parameters, forward and backward;
* ``tbptt, compiled``: the same with ``compile=True`` (each inner step a compiled graph with its
  compiled backward; ``estimator.compile=true`` with ``estimator=tbptt``);
* ``loop``: the same arithmetic one instance at a time in a Python loop (``--loop``), the naive
  way to train a population (its rate does not depend on P; timed on at most 8 instances).

Each path is timed ``--repeats`` times after a warm-up, interleaved, and the median kept.
"steps/s" = instances x inner steps / wall time. ``--jax`` (the optional ``bench`` extra) also
runs the same truncation in JAX, ``jit(vmap(lax.scan))`` as learned_optimization does, on the
same instances and minibatches (handed to JAX as arrays, as a data iterator would; the l2o side
gathers them inside its unroll), after checking that both give the same inner losses
(``jax_unroll.check_same_losses``) and the same TBPTT meta-gradient
(``jax_unroll.check_same_meta_gradients``).

    python scripts/bench_meta_train.py --threads 1
    python scripts/bench_meta_train.py --populations 1 8 64 --jax --threads 2
    python scripts/bench_meta_train.py --checkpoint default --populations 1 8 64 --jax --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import grad_and_value

from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
from l2o.meta.losses import get_meta_loss
from l2o.meta.unroll import _compiled_inner_step, init_carry, unroll
from l2o.optim.base import apply_updates
from l2o.tasks.base import members_batch
from l2o.tasks.registry import get_task


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Setup:
    """The shipped learned optimizer and the task on ``device``, a population of P members."""

    def __init__(
        self, device: torch.device, population: int, steps: int, checkpoint: str = "mlp_2x32"
    ) -> None:
        lopt, meta, _ = load_checkpoint(resolve_checkpoint(checkpoint))
        self.lopt, self.device, self.steps = lopt, device, steps
        self.meta = {k: v.to(device) for k, v in meta.items()}
        self.task = get_task("mlp", dataset="mnist1d", width=32, depth=2, batch_size=64)
        self.task = self.task.to(device)
        self.seeds = torch.arange(population, dtype=torch.int64)
        g = torch.Generator().manual_seed(0)
        self.stacked = {  # ES-style perturbed copies, one per member
            k: (v + 0.01 * torch.randn((population, *v.shape), generator=g).to(device))
            for k, v in self.meta.items()
        }

        with torch.no_grad():  # the episode's start, outside the timed truncations
            self.carry = init_carry(self.lopt.rule(self.meta), self.task, self.seeds)

    def forward(self, compile: bool) -> None:
        with torch.no_grad():
            unroll(
                self.lopt.rule,
                self.task,
                self.carry,
                self.steps,
                population_meta_params=self.stacked,
                compile=compile,
            )

    def forward_per_step(self) -> None:
        """The compiled forward path as it was before the scan: one compiled graph per inner
        step, called from a Python loop (``_compiled_inner_step``, the path
        ``unroll(compile=True, eval_mode="each")`` still takes), for the side-by-side ratio."""
        seeds = self.seeds.tolist()
        params, state, step = self.carry["params"], self.carry["opt_state"], self.carry["step"]
        first = self.carry["step"].tolist()
        with torch.no_grad():
            for k in range(self.steps):
                batch = members_batch(self.task, seeds, [s + k for s in first], "train")
                params, state, _ = _compiled_inner_step(
                    self.lopt.rule, self.task, params, state, step, batch, self.stacked
                )
                step = step + 1

    def tbptt(self, compile: bool) -> dict[str, torch.Tensor | None]:
        """The meta-gradient of the truncation's ``train_mean`` (None for a meta-parameter
        the update does not use, e.g. ``log_lr_vector`` where AdamW updates the vectors)."""
        meta = {k: v.detach().requires_grad_() for k, v in self.meta.items()}
        rule = self.lopt.rule(meta)
        result = unroll(rule, self.task, self.carry, self.steps, compile=compile)
        loss = get_meta_loss("train_mean")(result.terms).mean()
        grads = torch.autograd.grad(loss, list(meta.values()), allow_unused=True)
        return dict(zip(meta, grads, strict=True))

    def loop(self) -> None:
        rule = self.lopt.rule(self.meta)
        with torch.no_grad():
            for seed in self.seeds[:8].tolist():
                params = {k: v.to(self.device) for k, v in self.task.init_from_seed(seed).items()}
                state = rule.init(params)
                for step in range(self.steps):
                    grads, _ = grad_and_value(self.task.loss)(params, self.task.batch(seed, step))
                    updates, state = rule.update(grads, state, params, step=step)
                    params = apply_updates(params, updates)


def jax_paths(setup: Setup) -> dict[str, tuple[Callable, int]]:
    """The same truncation in JAX (``scripts/jax_unroll.py``), after checking that it gives the
    same inner losses as l2o's unroll on the same instances and data."""
    import jax
    import jax.numpy as jnp
    from jax_unroll import (
        check_same_losses,
        check_same_meta_gradients,
        population_inputs,
        to_jax,
        unroll_for,
    )

    params_t = setup.carry["params"]
    port = unroll_for(setup.lopt, list(params_t), [tuple(v.shape[1:]) for v in params_t.values()])
    params, xs, ys = population_inputs(setup.task, setup.seeds.tolist(), setup.steps)
    meta, stacked = to_jax(setup.meta), to_jax(setup.stacked)
    forward, tbptt = port.forward(), port.tbptt()
    with torch.no_grad():
        expected = unroll(setup.lopt.rule(setup.meta), setup.task, setup.carry, setup.steps)
    population = len(setup.seeds)
    shared = {k: jnp.broadcast_to(v, (population, *v.shape)) for k, v in meta.items()}
    deviation = check_same_losses(forward(shared, params, xs, ys)[0], expected.losses)
    gradient_deviation = check_same_meta_gradients(tbptt(meta, params, xs, ys), setup.tbptt(False))
    print(
        f"P={population}: JAX and l2o inner losses agree over the first 5 steps (rtol 1e-4); "
        f"largest relative difference over all {setup.steps}: {deviation:.1e}; TBPTT "
        f"meta-gradients agree (rtol 1e-2), largest relative difference {gradient_deviation:.1e}",
        flush=True,
    )
    n = population * setup.steps
    return {
        "JAX jit(vmap(scan)) forward": (
            lambda: jax.block_until_ready(forward(stacked, params, xs, ys)),
            n,
        ),
        "JAX jit(grad(vmap(scan))) tbptt": (
            lambda: jax.block_until_ready(tbptt(meta, params, xs, ys)),
            n,
        ),
    }


def measure(paths: dict[str, tuple[Callable, int]], repeats: int, device) -> dict:
    """Median steps/s of each path (``fn``, instances it trains per call), and warm-up time."""
    warmup, times = {}, {name: [] for name in paths}
    for name, (fn, _) in paths.items():
        start = time.perf_counter()
        fn()
        _sync(device)
        warmup[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, (fn, _) in paths.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {
        name: (instances / statistics.median(times[name]), warmup[name])
        for name, (_, instances) in paths.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=20, help="K, inner steps per truncation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpoint", default="mlp_2x32", help="the learned optimizer inside (a shipped name)"
    )
    parser.add_argument("--loop", action="store_true", help="also time the Python loop")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu [cuda]")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--jax", action="store_true", help="also run the unroll in JAX (the bench extra)"
    )
    args = parser.parse_args()
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"MLP 40-32-32-10 on MNIST-1D, batch 64, K={args.steps}, learned optimizer: "
        f"{args.checkpoint}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n"
    )
    print("| device | P | path | inner steps/s | ratio to eager forward | warm-up s |")
    print("|---|---:|---|---:|---:|---:|")
    for name in devices:
        device = torch.device(name)
        label = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for population in args.populations:
            setup = Setup(device, population, args.steps, args.checkpoint)
            n = population * args.steps
            paths = {
                "forward": (lambda s=setup: s.forward(compile=False), n),
                "forward, compiled": (lambda s=setup: s.forward(compile=True), n),
                "forward, compiled per step": (setup.forward_per_step, n),
                "tbptt": (lambda s=setup: s.tbptt(compile=False), n),
                "tbptt, compiled": (lambda s=setup: s.tbptt(compile=True), n),
            }
            if args.loop:
                paths["loop"] = (setup.loop, min(8, population) * args.steps)
            if args.jax:
                paths.update(jax_paths(setup))
            rates = measure(paths, args.repeats, device)
            base = rates["forward"][0]
            for path, (steps_per_s, warmup) in rates.items():
                print(
                    f"| {label} | {population} | {path} | {steps_per_s:,.0f} | "
                    f"{steps_per_s / base:.2f} | {warmup:.1f} |",
                    flush=True,
                )
            if args.jax:
                jax_forward = rates["JAX jit(vmap(scan)) forward"][0]
                jax_tbptt = rates["JAX jit(grad(vmap(scan))) tbptt"][0]
                print(
                    f"\nP={population}: l2o / JAX, forward eager {base / jax_forward:.2f}x, "
                    f"forward compiled {rates['forward, compiled'][0] / jax_forward:.2f}x "
                    f"(per step {rates['forward, compiled per step'][0] / jax_forward:.2f}x), "
                    f"tbptt {rates['tbptt'][0] / jax_tbptt:.2f}x "
                    f"(compiled {rates['tbptt, compiled'][0] / jax_tbptt:.2f}x)\n",
                    flush=True,
                )


if __name__ == "__main__":
    main()
