"""Training curves of a shipped checkpoint and of tuned Adam on held-out seeds of the
checkpoint's meta-training family: what the shipped cards' claims are checked on."""

from __future__ import annotations

import torch

from l2o.eval.cells import CellStore
from l2o.eval.contenders import rule_contender
from l2o.eval.evaluation import Settings, _tune
from l2o.eval.metrics import smooth
from l2o.eval.runs import run_rule
from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
from l2o.meta.configure import build, compose_config
from l2o.optim import get
from l2o.tasks.suites import HELD_OUT_SEED, SuiteEntry, get_suite


def shipped_curves(
    checkpoint: str, checkpoint_id: str, experiment: str, steps: int, seeds: int, tmp_path
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed mean training losses ``(adam, learned)`` over ``seeds`` held-out seeds of
    ``steps`` steps, on the task of ``configs/experiment/<experiment>.yaml``; Adam's rate tuned
    on tuning seeds over 3e-3, 1e-2, 3e-2 (and checked to be an interior optimum)."""
    task = build(compose_config(f"experiment={experiment}"), torch.device("cpu"))["task"]
    task = task.sample(HELD_OUT_SEED)
    lopt, meta, card = load_checkpoint(resolve_checkpoint(checkpoint))
    assert card["id"] == checkpoint_id
    held_out = tuple(HELD_OUT_SEED + i for i in range(seeds))
    entry = SuiteEntry(f"{experiment}_task", task, steps, held_out)
    settings = Settings(grid=(3e-3, 1e-2, 3e-2), tuning_seeds=4)
    tuned = _tune(rule_contender("adam"), entry, settings, CellStore(tmp_path))
    assert tuned["lr"] in (3e-3, 1e-2)  # an interior optimum: the grid brackets Adam's best
    adam = run_rule(get("adam", lr=tuned["lr"]), task, held_out, steps).curves
    learned = run_rule(lopt.rule(meta), task, held_out, steps).curves
    return smooth(adam.mean(1, keepdim=True))[:, 0], smooth(learned.mean(1, keepdim=True))[:, 0]


def autoencoder_ratios(checkpoint: str, checkpoint_id: str) -> tuple[float, float]:
    """``(training, held-out)``: a shipped checkpoint's final losses over tuned Adam's (lr 3e-3,
    its tuned rate in l2o-eval's ``real_models`` run) on that suite's 10,000-step autoencoder,
    2 held-out seeds, no guard; the checkpoint's losses checked finite first."""
    (entry,) = [e for e in get_suite("real_models", n_seeds=2).entries if "autoencoder" in e.name]
    assert entry.horizon == 10_000
    lopt, meta, card = load_checkpoint(resolve_checkpoint(checkpoint))
    assert card["id"] == checkpoint_id
    learned = run_rule(lopt.rule(meta), entry.task, entry.seeds, entry.horizon)
    adam = run_rule(get("adam", lr=3e-3), entry.task, entry.seeds, entry.horizon)
    assert torch.isfinite(learned.curves).all()
    final = [float(run.curves[-100:].mean()) for run in (learned, adam)]
    held_out = [float(run.eval_losses.mean()) for run in (learned, adam)]
    return final[0] / final[1], held_out[0] / held_out[1]
