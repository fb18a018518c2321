"""The claims of checkpoints/ortho_mlp.md, on held-out seeds of its family against tuned Adam:
in distribution (fast, in CI) and at ten times the 200-step evaluation horizon (slow)."""

from __future__ import annotations

import pytest
import torch

from l2o.eval.cells import CellStore
from l2o.eval.contenders import rule_contender
from l2o.eval.evaluation import Settings, _tune
from l2o.eval.metrics import smooth, steps_to_reach
from l2o.eval.runs import run_rule
from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
from l2o.meta.configure import build, compose_config
from l2o.optim import get
from l2o.tasks.suites import HELD_OUT_SEED, SuiteEntry


def _curves(steps: int, seeds: int, tmp_path):
    task = build(compose_config("experiment=ortho_mlp"), torch.device("cpu"))["task"]
    task = task.sample(HELD_OUT_SEED)
    lopt, meta, card = load_checkpoint(resolve_checkpoint("ortho_mlp"))
    assert card["id"] == "ortho_mlp-b40a2ff24547"
    held_out = tuple(HELD_OUT_SEED + i for i in range(seeds))
    entry = SuiteEntry("mnist1d_mlp", task, steps, held_out)
    settings = Settings(grid=(3e-3, 1e-2, 3e-2), tuning_seeds=4)
    tuned = _tune(rule_contender("adam"), entry, settings, CellStore(tmp_path))
    assert tuned["lr"] in (3e-3, 1e-2)  # an interior optimum: the grid brackets Adam's best
    adam = run_rule(get("adam", lr=tuned["lr"]), task, held_out, steps).curves
    learned = run_rule(lopt.rule(meta), task, held_out, steps).curves
    return smooth(adam.mean(1, keepdim=True))[:, 0], smooth(learned.mean(1, keepdim=True))[:, 0]


def test_in_distribution_it_reaches_tuned_adams_final_loss_in_70_percent_of_the_steps(tmp_path):
    """Card: 200 steps, 8 held-out seeds: Adam's final loss at step 129 (0.65 of 200)."""
    adam, learned = _curves(200, 8, tmp_path)
    reached = steps_to_reach(learned, float(adam[-1]))
    assert reached is not None and reached <= 0.7 * 200, reached


@pytest.mark.slow
def test_at_ten_times_the_horizon_it_ends_at_or_below_tuned_adams_loss(tmp_path):
    """Card: 2,000 steps (x10 of the 200-step evaluation horizon), 4 held-out seeds, no guard:
    a final training loss no higher than tuned Adam's (l2o-eval: 0.928 of Adam's)."""
    adam, learned = _curves(2000, 4, tmp_path)
    assert torch.isfinite(learned).all()
    assert float(learned[-1]) <= float(adam[-1])
