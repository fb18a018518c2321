"""Training curves, LR tuning and steps-to-target (l2o.eval.curves)."""

import math

import pytest
import torch

from l2o.eval.curves import (
    compare_with_tuned,
    steps_to_reach,
    training_curves,
    tune_lr,
    windowed_mean,
)
from l2o.optim import get
from l2o.tasks import get_task


def test_training_curves_match_a_torch_optim_loop():
    task = get_task("quadratic", dim=5, cond=10.0, noise_std=0.1)
    seeds = [3, 4]
    curves = training_curves(get("sgd", lr=0.3, momentum=0.9), task, seeds, 25, chunk=7)
    for j, seed in enumerate(seeds):
        params = {k: v.clone().requires_grad_() for k, v in task.init_from_seed(seed).items()}
        opt = torch.optim.SGD(params.values(), lr=0.3, momentum=0.9)
        for step in range(25):
            opt.zero_grad()
            loss = task.loss(params, task.batch(seed, step))
            loss.backward()
            opt.step()
            assert float(curves[step, j]) == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-7)


def test_windowed_mean_is_a_trailing_average_over_seeds():
    curves = torch.rand(30, 3)
    mean = curves.mean(dim=1)
    expected = torch.stack([mean[max(0, t - 4) : t + 1].mean() for t in range(30)])
    torch.testing.assert_close(windowed_mean(curves, window=5), expected)


def test_steps_to_reach_counts_steps_taken_and_ignores_nonfinite():
    smoothed = torch.tensor([5.0, float("nan"), 3.0, 2.0, 1.0])
    assert steps_to_reach(smoothed, 3.0) == 3
    assert steps_to_reach(smoothed, 0.5) is None


def test_tune_lr_picks_the_grid_point_with_the_lowest_final_loss():
    task = get_task("quadratic", dim=5, cond=10.0)
    tuned = tune_lr("sgd", task, [0, 1], 20, [1e-3, 0.1, 1.0, 30.0])
    assert tuned.grid[30.0] == math.inf  # diverged: never chosen
    assert tuned.lr == min(tuned.grid, key=tuned.grid.get)
    assert tuned.final_loss == tuned.grid[tuned.lr]


def test_compare_with_tuned_reports_steps_to_the_baseline_final_loss():
    task = get_task("quadratic", dim=5, cond=10.0)
    # Heavy ball with its optimal (lr, momentum) for κ=10 against tuned plain SGD.
    result = compare_with_tuned(
        get("sgd", lr=2.0, momentum=0.27), task, [0, 1], 60, baseline="sgd", grid=[0.01, 0.1, 1.0]
    )
    assert result.steps_to_baseline_final is not None
    assert result.step_ratio == result.steps_to_baseline_final / 60
    assert result.step_ratio < 1.0
