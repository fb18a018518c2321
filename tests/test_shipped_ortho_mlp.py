"""The claims of checkpoints/ortho_mlp.md, on held-out seeds of its family against tuned Adam:
in distribution (fast, in CI) and at ten times the 200-step evaluation horizon (slow)."""

from __future__ import annotations

import pytest
import torch
from _shipped_curves import shipped_curves

from l2o.eval.metrics import steps_to_reach


def _curves(steps: int, seeds: int, tmp_path):
    return shipped_curves(
        "ortho_mlp", "ortho_mlp-b40a2ff24547", "ortho_mlp", steps, seeds, tmp_path
    )


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
