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


def _torch_sgd_losses(task, seeds, steps, lr, momentum=0.0) -> torch.Tensor:
    """``[steps, seeds]`` minibatch losses of ``torch.optim.SGD``: a reference no l2o code runs."""
    out = torch.empty(steps, len(seeds), dtype=torch.float64)
    for j, seed in enumerate(seeds):
        params = {k: v.clone().requires_grad_() for k, v in task.init_from_seed(seed).items()}
        opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum)
        for step in range(steps):
            opt.zero_grad()
            loss = task.loss(params, task.batch(seed, step))
            loss.backward()
            opt.step()
            out[step, j] = float(loss.detach())
    return out


def _smoothed(losses: torch.Tensor, window: int = 10) -> list[float]:
    mean = losses.mean(dim=1)
    return [float(mean[max(0, t - window + 1) : t + 1].mean()) for t in range(len(mean))]


def test_tune_lr_picks_the_grid_point_with_the_lowest_final_loss():
    task = get_task("quadratic", dim=5, cond=10.0)
    grid = [1e-3, 0.1, 1.0, 30.0]
    tuned = tune_lr("sgd", task, [0, 1], 20, grid)
    finals = {lr: _smoothed(_torch_sgd_losses(task, [0, 1], 20, lr))[-1] for lr in grid}
    assert not math.isfinite(finals[30.0]) and tuned.grid[30.0] == math.inf  # never chosen
    best = min((lr for lr in grid if math.isfinite(finals[lr])), key=finals.get)
    assert tuned.lr == best
    assert tuned.final_loss == pytest.approx(finals[best], rel=1e-5)


def test_compare_with_tuned_reports_steps_to_the_baseline_final_loss():
    task = get_task("quadratic", dim=5, cond=10.0)
    # Heavy ball with its optimal (lr, momentum) for κ=10 against tuned plain SGD.
    result = compare_with_tuned(
        get("sgd", lr=2.0, momentum=0.27), task, [0, 1], 60, baseline="sgd", grid=[0.01, 0.1, 1.0]
    )
    baseline = min(
        _smoothed(_torch_sgd_losses(task, [0, 1], 60, lr))[-1] for lr in (0.01, 0.1, 1.0)
    )
    heavy_ball = _smoothed(_torch_sgd_losses(task, [0, 1], 60, 2.0, momentum=0.27))
    first = next(t for t, v in enumerate(heavy_ball) if v <= baseline * (1 + 1e-6))
    assert result.steps_to_baseline_final == first + 1  # steps taken, not the index
    assert result.step_ratio == pytest.approx((first + 1) / 60)
    assert result.step_ratio < 1.0
