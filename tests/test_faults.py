"""Fault injection: every way a user (or a crash) can break a run, and what l2o does about it.

Each test injects one fault from issue #13 (a bad gradient, a raising closure, a kill at a write
point, a flipped bit, a hostile file, ...) and checks that nothing is lost or silently wrong.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import vmap

import l2o
from l2o.guard import GuardRule
from l2o.optim import get as get_rule
from l2o.optim.base import apply_updates


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)


def _closure(opt, model, x, y, *, poison=None):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if poison is not None:
            poison(model)
        return loss

    return closure


def _all_state_finite(opt) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


# --- the guarded optimizer --------------------------------------------------------------------


def test_guard_with_an_sgd_fallback_steps_and_round_trips_its_state():
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(
        model.parameters(), fallback="sgd", fallback_kwargs={"lr": 0.05}
    )
    losses = [float(opt.step(_closure(opt, model, x, y))) for _ in range(10)]
    stats = opt.guard_stats
    assert stats["learned_steps"] + stats["fallback_steps"] == 10
    assert losses[-1] < losses[0]
    again = l2o.GuardedLearnedOptimizer(
        model.parameters(), fallback="sgd", fallback_kwargs={"lr": 0.05}
    )
    again.load_state_dict(opt.state_dict())
    assert again.guard_stats == stats


def test_one_inf_gradient_entry_resets_the_state_instead_of_poisoning_it():
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(model.parameters())

    def inf_entry(m):
        m[0].weight.grad[0, 0] = float("inf")

    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    with pytest.warns(RuntimeWarning, match="non-finite optimizer state"):
        opt.step(_closure(opt, model, x, y, poison=inf_entry))
    assert _all_state_finite(opt)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    before = opt.guard_stats
    assert before["state_resets"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for _ in range(5):
            opt.step(_closure(opt, model, x, y, poison=inf_entry if _ == 2 else None))
    after = opt.guard_stats
    taken = after["learned_steps"] + after["fallback_steps"]
    assert taken - (before["learned_steps"] + before["fallback_steps"]) >= 4  # training goes on
    assert _all_state_finite(opt)


@pytest.mark.parametrize("fail_at_call", [2, 3])
def test_a_closure_that_raises_mid_step_leaves_everything_as_before(fail_at_call):
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(model.parameters())
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    calls = {"n": 0}
    inner = _closure(opt, model, x, y)

    def flaky():
        calls["n"] += 1
        if calls["n"] == fail_at_call:  # 1: the step's own; 2, 3: the candidates
            raise RuntimeError("data loader died")
        return inner()

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(flaky)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    opt.step(_closure(opt, model, x, y))  # and the optimizer still works


@pytest.mark.parametrize("returned", [None, "vector"])
def test_a_closure_that_does_not_return_one_loss_is_a_clear_error(returned):
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(model.parameters())

    def closure():
        opt.zero_grad()
        losses = ((model(x) - y) ** 2).squeeze(1)
        losses.mean().backward()
        return None if returned is None else losses

    with pytest.raises(TypeError, match="must return the loss as one number"):
        opt.step(closure)


def test_complex_parameters_are_refused_with_a_clear_error():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"complex.*view_as_real"):
        l2o.LearnedOptimizer([z])
    with pytest.raises(TypeError, match="complex"):
        l2o.optim.Adam([z])


def test_loading_a_state_of_other_shapes_is_refused_and_keeps_the_current_state():
    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(7))
    small = l2o.optim.Adam([a])
    a.grad = torch.ones(1)
    small.step()
    big = l2o.optim.Adam([b])
    b.grad = torch.ones(7)
    big.step()
    before = big.state_dict()
    with pytest.raises(ValueError, match=r"float32\[1\].*float32\[7\]"):
        big.load_state_dict(small.state_dict())
    assert all(torch.equal(big.state[b][k], before["state"][0][k]) for k in before["state"][0])


def test_guard_with_compare_every_vmaps_and_matches_member_by_member():
    rule = GuardRule(
        learned=get_rule("adam", lr=0.3), fallback=get_rule("sgd", lr=0.1), compare_every=2
    )
    curvature = torch.tensor([[1.0, 10.0], [3.0, 0.5], [2.0, 2.0]])
    start = {"w": torch.tensor([[1.0, -1.0], [2.0, 0.5], [-1.0, 1.0]])}

    def member(params, h, state, step):
        loss_fn = lambda p: 0.5 * (h * p["w"] ** 2).sum()  # noqa: E731
        grads = {"w": h * params["w"]}
        updates, state = rule.update(grads, state, params, step=step, loss_fn=loss_fn)
        return apply_updates(params, updates), state

    params, state = start, vmap(rule.init)(start)
    for t in range(6):
        steps = torch.full((3,), t, dtype=torch.int64)
        params, state = vmap(member)(params, curvature, state, steps)
    for i in range(3):
        p, s = {"w": start["w"][i]}, rule.init({"w": start["w"][i]})
        for t in range(6):
            p, s = member(p, curvature[i], s, t)
        torch.testing.assert_close(params["w"][i], p["w"])
        assert int(state["comparisons"][i]) == int(s["comparisons"]) == 3
