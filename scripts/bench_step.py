"""Drop-in optimizer step cost against torch.optim.AdamW, every ratio measured in one run.

Two measurements, on MLPs ``w -> w -> w -> 10`` sized to ``--params``:

1. **The optimizer step alone** (gradients given, ``opt.step()``): torch AdamW
   (``foreach=True`` on CPU, ``fused=True`` on CUDA), ``l2o.LearnedOptimizer`` with each of
   ``--checkpoints`` (the fused, blocked step) and the same optimizer on the reference path
   (every tensor's feature matrix materialised, the oracle), and Muon (``torch.optim.Muon`` on
   the matrices with AdamW on the rest, and l2o's ``muon`` rule) because the orthogonalising
   ``ortho_mlp`` runs the same Newton–Schulz iteration. Rounds are interleaved and the median
   taken, so a busy machine slows every contender alike. Also: time per parameter, arithmetic
   floors at this machine's measured matrix-multiply rate (a learned optimizer's per-coordinate
   MLP multiply-adds; Newton–Schulz's matrix products, 5 iterations on every matrix) and the
   step's transient memory (peak above what was allocated before the step: CUDA's allocator
   statistics, or on CPU the resident memory of a child process sampled every 0.2 ms, with
   glibc told to return every allocation above 64 kB to the OS, which it otherwise keeps for
   reuse; a child, not the timed process, because that setting slows small allocations).
2. **A training step** ``opt.step(closure)`` with forward and backward inside the closure, as in
   a training loop, including the guarded optimizer.

    python scripts/bench_step.py                      # CPU, and CUDA when present
    python scripts/bench_step.py --params 1e6 1e7 --devices cpu --threads 2
    python scripts/bench_step.py --checkpoints ortho_mlp --params 1e6
    python scripts/bench_step.py --checkpoints ortho_mlp --ns-dtypes bfloat16  # + bf16 NS rows

``--ns-dtypes`` adds, for each orthogonalising checkpoint, the fused step with its Newton–Schulz
iteration in those dtypes (``LearnedOptimizer(..., ns_dtype=...)``). ``--compile`` adds, for each
checkpoint with a compiled path, that path (``LearnedOptimizer(..., compile=True)``) in float32
and in each of ``--ns-dtypes``; it compiles before the timed rounds.

    python scripts/bench_step.py --checkpoints ortho_mlp --ns-dtypes bfloat16 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

import l2o
from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
from l2o.learned.optimizer import CheckpointedRules
from l2o.optim import Adam as L2OAdam

#: Learned-MLP multiply-adds per coordinate of the ``mlp`` optimizer's fused path: 22
#: per-coordinate features -> 32 -> 32 -> 2 (the row and column statistics' share of the first
#: layer is computed per row/column).
MLP_FUSED_MACS_PER_COORDINATE = 22 * 32 + 32 * 32 + 32 * 2


def macs_per_coordinate(lopt) -> int:
    """Multiply-adds of the per-coordinate MLP of a shipped learned optimizer's fused path."""
    if lopt.name == "mlp":
        return MLP_FUSED_MACS_PER_COORDINATE
    sizes = [lopt.num_features, *lopt.hidden_sizes, 2]  # ortho_mlp: step embedding in the bias
    return sum(a * b for a, b in itertools.pairwise(sizes))


def newton_schulz_flops(model: nn.Module, steps: int = 5) -> int:
    """FLOPs of ``steps`` quintic Newton–Schulz iterations on every matrix of ``model``: per
    iteration on ``X`` of ``[A, B]`` (``A <= B``), ``X Xᵀ`` (2A²B), ``G G`` (2A³), ``(·) X``
    (2A²B)."""
    total = 0
    for p in model.parameters():
        if p.ndim >= 2:
            a, b = sorted((p.shape[0], math.prod(p.shape[1:])))
            total += steps * (4 * a * a * b + 2 * a**3)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _width(n_params: float) -> int:
    # 2 w^2 + 13 w + 10 parameters (two w x w layers, a w x 10 head, biases).
    return max(4, round((-13 + math.sqrt(169 + 8 * (n_params - 10))) / 4))


def _model(width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).to(device)


def _adamw(params, device: torch.device) -> torch.optim.Optimizer:
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=1e-3, **kw)


def _torch_muon(params, device: torch.device) -> list[torch.optim.Optimizer]:
    """``torch.optim.Muon`` (2-D parameters only) with AdamW on the others, as its docs advise."""
    params = list(params)
    matrices = [p for p in params if p.ndim == 2]
    return [
        torch.optim.Muon(matrices, lr=0.02, adjust_lr_fn="match_rms_adamw"),
        _adamw([p for p in params if p.ndim != 2], device),
    ]


class Optimizers:
    """Several optimizers over disjoint parameters stepped as one (Muon with AdamW)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _reference_path(opt: l2o.LearnedOptimizer, device: torch.device) -> l2o.LearnedOptimizer:
    """The same optimizer with the fused path switched off (every tensor below chunk_size)."""
    rule = opt.learned.rule(device)
    opt.learned._rules[device] = dataclasses.replace(rule, chunk_size=2**62)
    return opt


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or the resident set
    size of this process sampled every 0.2 ms on CPU (large tensors are mmap-ed, so RSS follows
    their allocation and release)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._rss()
        self._high = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.0002):
                self._high = max(self._high, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._high, self._rss()) - self._start


def matmul_rate(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matrix-multiply rate (FLOP/s) in ``dtype`` on 2048 x 2048 operands."""
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    times = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times)


def _orthogonalises(checkpoint: str) -> bool:
    return "ns_dtype" in load_checkpoint(resolve_checkpoint(checkpoint))[0].config()


def _compilable(checkpoint: str) -> bool:
    try:
        CheckpointedRules(checkpoint, compile=True)
    except ValueError:
        return False
    return True


def _step_alone_contenders(
    device: torch.device, checkpoints: list[str], ns_dtypes: list[str], compile: bool = False
) -> dict[str, Callable]:
    contenders: dict[str, Callable] = {"torch AdamW": lambda p: _adamw(p, device)}
    for name in checkpoints:
        contenders[f"l2o LearnedOptimizer {name} (fused)"] = lambda p, c=name: l2o.LearnedOptimizer(
            p, checkpoint=c
        )
        contenders[f"l2o LearnedOptimizer {name} (reference)"] = lambda p, c=name: _reference_path(
            l2o.LearnedOptimizer(p, checkpoint=c), device
        )
        for dtype in ns_dtypes if _orthogonalises(name) else ():
            contenders[f"l2o LearnedOptimizer {name} ({dtype} NS, fused)"] = (
                lambda p, c=name, d=dtype: l2o.LearnedOptimizer(p, checkpoint=c, ns_dtype=d)
            )
        for dtype in [None, *ns_dtypes] if compile and _compilable(name) else []:
            label = f"{dtype} NS, compiled" if dtype else "compiled"
            contenders[f"l2o LearnedOptimizer {name} ({label})"] = lambda p, c=name, d=dtype: (
                l2o.LearnedOptimizer(p, checkpoint=c, ns_dtype=d, compile=True)
            )
    contenders["torch Muon (bf16 NS) + AdamW"] = lambda p: Optimizers(_torch_muon(p, device))
    contenders["l2o Muon (float32 NS)"] = lambda p: l2o.optim.Muon(p, lr=0.02, ns_dtype="float32")
    return contenders


def _prepared(make: Callable, width: int, device: torch.device):
    """An optimizer over a fresh model with fixed gradients, its state already allocated."""
    model = _model(width, device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    opt = make(list(model.parameters()))
    opt.step()
    return opt


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    tensors = (t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)


def step_memory(
    n_params: float,
    device: torch.device,
    checkpoints: list[str],
    ns_dtypes: list[str],
    compile: bool = False,
) -> dict[str, tuple[int, int]]:
    """Per contender: (transient bytes of one step, optimizer state bytes)."""
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        command = [sys.executable, __file__, "--memory-of", str(n_params), "--devices", "cpu"]
        command += ["--checkpoints", *checkpoints, "--ns-dtypes", *ns_dtypes]
        command += ["--compile"] if compile else []
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        return {k: tuple(v) for k, v in json.loads(out.stdout.splitlines()[-1]).items()}
    found = {}
    for name, make in _step_alone_contenders(device, checkpoints, ns_dtypes, compile).items():
        opt = _prepared(make, _width(n_params), device)
        with PeakMemory(device) as memory:
            opt.step()
        found[name] = (memory.peak, _state_bytes(opt))
        del opt
    return found


def bench_step_alone(
    n_params: float,
    device: torch.device,
    rounds: int,
    steps: int,
    checkpoints: list[str],
    ns_dtypes: list[str],
    compile: bool = False,
) -> dict:
    width = _width(n_params)
    contenders = _step_alone_contenders(device, checkpoints, ns_dtypes, compile)
    runs = {
        name: {"opt": _prepared(make, width, device), "times": []}
        for name, make in contenders.items()
    }
    for _ in range(rounds):  # interleaved: every contender sees the same machine load
        for run in runs.values():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                run["opt"].step()
            _sync(device)
            run["times"].append((time.perf_counter() - start) / steps)
    n = sum(p.numel() for p in _model(width, device).parameters())
    return {"n": n, "medians": {k: statistics.median(v["times"]) for k, v in runs.items()}}


def _train_step_contenders(device: torch.device, checkpoints: list[str]) -> dict[str, Callable]:
    contenders: dict[str, Callable] = {
        "torch AdamW": lambda p: _adamw(p, device),
        "l2o Adam (rule adapter)": lambda p: L2OAdam(p, lr=1e-3),
    }
    for name in checkpoints:
        contenders[f"l2o LearnedOptimizer {name}"] = lambda p, c=name: l2o.LearnedOptimizer(
            p, checkpoint=c
        )
        contenders[f"l2o GuardedLearnedOptimizer {name}"] = lambda p, c=name: (
            l2o.GuardedLearnedOptimizer(p, checkpoint=c)
        )
        contenders[f"l2o GuardedLearnedOptimizer {name} (deferred)"] = lambda p, c=name: (
            l2o.GuardedLearnedOptimizer(p, checkpoint=c, deferred=True)
        )
    return contenders


def bench_train_step(
    width: int, batch: int, device: torch.device, rounds: int, steps: int, checkpoints: list[str]
):
    runs = {}
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    for name, make in _train_step_contenders(device, checkpoints).items():
        model = _model(width, device)
        opt = make(model.parameters())

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(2):
            opt.step(closure)
        runs[name] = {"opt": opt, "closure": closure, "times": []}
    for _ in range(rounds):
        for run in runs.values():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                run["opt"].step(run["closure"])
            _sync(device)
            run["times"].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(run["times"]) for name, run in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--checkpoints", nargs="+", default=["mlp_2x32", "ortho_mlp"])
    parser.add_argument("--ns-dtypes", nargs="*", default=[], help="e.g. bfloat16")
    parser.add_argument("--compile", action="store_true", help="add the compiled step's rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--train-width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-of", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of is not None:  # the child process of step_memory
        device = torch.device(args.devices[0])
        found = step_memory(args.memory_of, device, args.checkpoints, args.ns_dtypes, args.compile)
        print(json.dumps(found))
        return
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lopts = {name: load_checkpoint(resolve_checkpoint(name))[0] for name in args.checkpoints}
    for dev in devices:
        device = torch.device(dev)
        label = torch.cuda.get_device_name(device) if dev == "cuda" else "CPU"
        rate = matmul_rate(device)
        print(
            f"\n## {device} ({label}), torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print(f"float32 matmul rate (2048^2): {rate / 1e9:.0f} GFLOP/s")
        ns_rates = {
            dtype: matmul_rate(device, getattr(torch, dtype))
            for dtype in args.ns_dtypes
            if dtype != "float32"
        }
        for dtype, dtype_rate in ns_rates.items():
            print(f"{dtype} matmul rate (2048^2): {dtype_rate / 1e9:.0f} GFLOP/s")
        print("\nOptimizer step alone (gradients given), median of interleaved rounds:\n")
        print(
            "| params | optimizer | ms / step | ratio to AdamW | ns / param "
            "| transient MB | state MB |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|")
        for n_params in args.params:
            result = bench_step_alone(
                n_params,
                device,
                args.rounds,
                args.steps,
                args.checkpoints,
                args.ns_dtypes,
                args.compile,
            )
            n, medians = result["n"], result["medians"]
            memory = step_memory(n_params, device, args.checkpoints, args.ns_dtypes, args.compile)
            base = medians["torch AdamW"]
            for name, seconds in medians.items():
                transient, state = memory[name]
                print(
                    f"| {n:,} | {name} | {seconds * 1e3:.2f} | {seconds / base:.1f} "
                    f"| {seconds / n * 1e9:.1f} | {transient / 1e6:.1f} | {state / 1e6:.1f} |"
                )
            floors = {
                f"{name}: per-coordinate MLP": 2 * macs_per_coordinate(lopt) * n / rate
                for name, lopt in lopts.items()
            }
            ns_flops = newton_schulz_flops(_model(_width(n_params), device))
            floors["Newton–Schulz, 5 iterations"] = ns_flops / rate
            for dtype, dtype_rate in ns_rates.items():
                floors[f"Newton–Schulz, 5 iterations in {dtype}"] = ns_flops / dtype_rate
            for name, floor in floors.items():
                print(
                    f"| {n:,} | arithmetic floor, {name} | {floor * 1e3:.2f} "
                    f"| {floor / base:.1f} | {floor / n * 1e9:.1f} | | |"
                )
            print()
        n = sum(p.numel() for p in _model(args.train_width, device).parameters())
        print(
            f"\nTraining step opt.step(closure), MLP with {n:,} parameters, batch {args.batch}:\n"
        )
        print("| optimizer | ms / step | ratio to AdamW |")
        print("|---|---:|---:|")
        times = bench_train_step(
            args.train_width, args.batch, device, args.rounds, args.steps, args.checkpoints
        )
        base = times["torch AdamW"]
        for name, seconds in times.items():
            print(f"| {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
