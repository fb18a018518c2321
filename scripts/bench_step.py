"""Optimizer step time of the drop-in classes against torch.optim.AdamW, measured in one run.

Times ``opt.step(closure)`` (forward + backward inside the closure, as in a training loop) and
the bare ``opt.step()`` where the class allows it, on an MLP of about ``--params`` parameters.
Reports milliseconds per step and the ratio to AdamW (``fused=True`` on CUDA, ``foreach`` on CPU).

    python scripts/bench_step.py                 # CPU, and CUDA when present
    python scripts/bench_step.py --width 1024 --devices cuda
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import l2o
from l2o.optim import Adam as L2OAdam


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).to(device)


def _optimizers(device: torch.device):
    adamw_kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return {
        "torch AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, **adamw_kw),
        "l2o Adam (rule adapter)": lambda p: L2OAdam(p, lr=1e-3),
        "l2o LearnedOptimizer": lambda p: l2o.LearnedOptimizer(p),
        "l2o GuardedLearnedOptimizer": lambda p: l2o.GuardedLearnedOptimizer(p),
    }


def bench(make, width: int, batch: int, device: torch.device, steps: int) -> float:
    model = _model(width, device)
    x = torch.randn(batch, width, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = make(model.parameters())

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    _sync(device)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--devices", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        device = torch.device(dev)
        n = sum(p.numel() for p in _model(args.width, device).parameters())
        print(
            f"\n{device} ({torch.cuda.get_device_name(device) if dev == 'cuda' else 'CPU'}), "
            f"MLP with {n} parameters, batch {args.batch}, step(closure) incl. fwd+bwd"
        )
        print("| optimizer | ms / step | ratio to torch AdamW |")
        print("|---|---:|---:|")
        base = None
        for name, make in _optimizers(device).items():
            ms = bench(make, args.width, args.batch, device, args.steps)
            base = base or ms
            print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
