"""Random search and the evolution strategy: their published properties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import l2o.optim as O
from l2o.optim import gradient_free
from l2o.optim.base import FunctionalLoss, apply_updates

H = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64)


def quadratic(params):
    return 0.5 * (H * (params["w"] - 1.0) ** 2).sum()


def _run(rule, steps, x0=(3.0, -2.0, 0.5)):
    params = {"w": torch.tensor(x0, dtype=torch.float64)}
    state = rule.init(params)
    losses = [float(quadratic(params))]
    for step in range(steps):
        updates, state = rule.update({}, state, params, step=step, loss_fn=quadratic)
        params = apply_updates(params, updates)
        losses.append(float(quadratic(params)))
    return params, state, losses


def test_random_search_never_increases_the_loss_and_converges():
    torch.manual_seed(0)
    _, state, losses = _run(O.get("random_search", samples=2), 400)
    assert all(b <= a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 1e-6 * losses[0]
    assert 0 < int(state["successes"]) < 400


def test_one_fifth_rule_grows_sigma_on_success_and_shrinks_it_on_failure():
    rule = gradient_free.RandomSearch(sigma=0.5)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = rule.init(params)
    always_better = FunctionalLoss(lambda p: -p["w"].abs().sum(), known_loss=torch.tensor(0.0))
    _, grown = rule.update({}, state, params, step=0, loss_fn=always_better)
    never_better = FunctionalLoss(lambda p: p["w"].abs().sum(), known_loss=torch.tensor(0.0))
    updates, shrunk = rule.update({}, state, params, step=0, loss_fn=never_better)
    assert float(grown["sigma"]) == pytest.approx(0.5 * math.exp(1 / 3))
    assert float(shrunk["sigma"]) == pytest.approx(0.5 * math.exp(-1 / 12))
    assert torch.equal(updates["w"], torch.zeros(3, dtype=torch.float64))


def test_antithetic_estimate_without_shaping_is_the_gradient_of_a_quadratic():
    # E[(f(θ+σε) - f(θ-σε)) ε / 2σ] = E[εεᵀ] ∇f = ∇f exactly for a quadratic.
    torch.manual_seed(0)
    rule = gradient_free.EvolutionStrategy(samples=20000, sigma=0.3, fitness_shaping="none")
    params = {"w": torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)}
    estimate = rule.gradient_estimate(params, FunctionalLoss(quadratic))
    exact = torch.func.grad(quadratic)(params)["w"]
    # Per coordinate the estimate's standard deviation is about ‖∇f‖/√n.
    assert (estimate["w"] - exact).norm() < 0.03 * exact.norm()


def test_rank_shaping_makes_the_estimate_invariant_to_monotone_transforms_of_the_loss():
    rule = gradient_free.EvolutionStrategy(samples=16, sigma=0.1)
    params = {"w": torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)}
    torch.manual_seed(1)
    plain = rule.gradient_estimate(params, FunctionalLoss(quadratic))
    torch.manual_seed(1)
    warped = rule.gradient_estimate(params, FunctionalLoss(lambda p: torch.exp(quadratic(p))))
    torch.testing.assert_close(plain["w"], warped["w"])


def test_evolution_strategy_minimises_a_quadratic():
    torch.manual_seed(0)
    _, _, losses = _run(O.get("evolution_strategy", lr=0.05), 300)
    assert losses[-1] < 1e-3 * losses[0]


@pytest.mark.parametrize("name", ["random_search", "evolution_strategy"])
def test_gradient_free_rules_run_under_vmap(name):
    rule = O.get(name)
    stacked = {"w": torch.tensor([[3.0, -2.0, 0.5], [3.0, -2.0, 0.5]], dtype=torch.float64)}

    def run(params):
        state = rule.init(params)
        for step in range(5):
            updates, state = rule.update({}, state, params, step=step, loss_fn=quadratic)
            params = apply_updates(params, updates)
        return params

    out = torch.func.vmap(run, randomness="different")(stacked)["w"]
    assert not torch.equal(out[0], out[1])  # each member draws its own noise
    assert (
        torch.vmap(lambda w: quadratic({"w": w}))(out) <= quadratic({"w": stacked["w"][0]})
    ).all()
