"""Every registered optimizer as a torch.optim class: it trains a small MLP, refuses a missing
closure when it needs one, and resumes exactly from its state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import l2o.optim as O
from l2o.optim import registry

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

# Optimizers whose closure returns something else than the loss (tested in their own files).
SPECIAL_CLOSURES = {"levenberg_marquardt", "gauss_newton"}
# Hyper-parameters that make each one take a visible step on this task in a few updates.
SETTINGS = {
    "adadelta": {"lr": 10.0},
    "adagrad": {"lr": 0.1},
    "adafisher": {"lr": 0.01, "update_period": 5},
    "adafisher_w": {"lr": 0.01, "update_period": 5},
    "adahessian": {"lr": 0.1},
    "entropy_sgd": {"lr": 1.0},
    "inna": {"lr": 0.1},
    "momentum": {"lr": 0.05},
    "nesterov": {"lr": 0.05},
    "sgd": {"lr": 0.1},
    "sophia": {"lr": 0.02, "update_period": 2},
    "sophia_g": {"lr": 0.02, "update_period": 2},
    "random_search": {"sigma": 0.05, "samples": 4},
    "evolution_strategy": {"lr": 0.02},
    "swa": {"lr": 0.05},
    "ema": {"lr": 0.05},
    "sam": {"lr": 0.05},
    "asam": {"lr": 0.05},
    "lpf_sgd": {"lr": 0.05},
    "smoothout": {"lr": 0.05},
    "lookahead": {"lr": 1e-2},
    "muon": {"lr": 2e-2},
}
NAMES = [name for name in O.names() if name not in SPECIAL_CLOSURES]


def _task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    x = torch.randn(48, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, x, y


def _optimizer(name, model):
    cls = O.get_class(name)
    built_from = model if getattr(cls, "takes_model", False) else model.parameters()
    return cls(built_from, **SETTINGS.get(name, {}))


def _step(name, opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        # Exact Hessian-vector products for the rules that take them.
        loss.backward(create_graph=registry._entry(name).rule_cls.needs_loss_fn)
        return loss

    if name == "sophia_g":
        return opt.step(closure, logits_closure=lambda: model(x))
    return opt.step(closure)


def _loss(model, x, y):
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_decreases_the_loss_of_a_small_mlp(name):
    model, x, y = _task()
    opt = _optimizer(name, model)
    first = _loss(model, x, y)
    for _ in range(30):
        _step(name, opt, model, x, y)
    assert _loss(model, x, y) < 0.95 * first


def _needs_closure(name):
    cls = registry._entry(name).optimizer_cls
    return registry._entry(name).rule_cls.needs_loss_fn and not getattr(cls, "takes_model", False)


@pytest.mark.parametrize("name", [n for n in O.names() if _needs_closure(n)])
def test_closure_needing_optimizers_say_so_without_one(name):
    model, x, y = _task()
    opt = _optimizer(name, model)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly(name):
    model, x, y = _task()
    opt = _optimizer(name, model)
    for _ in range(3):
        _step(name, opt, model, x, y)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    resumed_model = copy.deepcopy(model)
    resumed = _optimizer(name, resumed_model)
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for i in range(3):
        torch.manual_seed(10 + i)  # the same noise for the noise-drawing rules
        _step(name, opt, model, x, y)
        torch.manual_seed(10 + i)
        _step(name, resumed, resumed_model, x, y)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _regression():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
    ).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    return model, x, torch.sin(x.sum(1, keepdim=True))


@pytest.mark.parametrize("name", sorted(SPECIAL_CLOSURES))
def test_least_squares_optimizers_fit_a_small_mlp_and_resume_exactly(name):
    """Their closure returns the residuals r(θ) = model(x) - y."""
    model, x, y = _regression()
    opt = O.get_class(name)(model.parameters())

    def residuals(net):
        return lambda: (net(x) - y).reshape(-1)

    first = float(0.5 * residuals(model)().pow(2).sum().detach())
    for _ in range(12):
        opt.step(residuals(model))
    assert float(0.5 * residuals(model)().pow(2).sum().detach()) < 0.5 * first
    resumed_model = copy.deepcopy(model)
    resumed = O.get_class(name)(resumed_model.parameters())
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(3):
        opt.step(residuals(model))
        resumed.step(residuals(resumed_model))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("fallback", ["sam", "lookahead", "swa", "adahessian", "bfgs", "inna"])
def test_new_rules_serve_as_the_guards_fallback(fallback):
    from l2o.guard import GuardRule
    from l2o.optim.adapter import RuleOptimizer

    model, x, y = _task()
    guarded = GuardRule(
        learned=O.get("sgd", lr=50.0),  # a diverging "learned" side: the fallback must win
        fallback=O.get(fallback, **SETTINGS.get(fallback, {})),
    )
    opt = RuleOptimizer(model.parameters(), guarded)
    first = _loss(model, x, y)
    for _ in range(15):
        _step(fallback, opt, model, x, y)
    assert _loss(model, x, y) < 0.97 * first
    state = next(iter(opt.state.values()))
    assert int(state["group:fallback_steps"]) > 0
