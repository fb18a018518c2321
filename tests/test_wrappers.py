"""Lookahead, SAM, Entropy-SGD, LPF-SGD / SmoothOut and weight averaging: against
pytorch-optimizer, torch.optim.swa_utils and their published formulas."""

from __future__ import annotations

import copy

import pytest
import pytorch_optimizer as po
import torch
from _meta_fixtures import Quadratic
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import l2o.optim as O
from l2o.meta.unroll import init_carry, unroll
from l2o.optim import rules, wrappers
from l2o.optim.base import apply_updates


def _task(seed: int = 0):
    """A tanh MLP on a small regression, in float64."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).double()
    x = torch.randn(48, 4, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    return model, x, y


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _functional(model, x, y):
    def loss(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return loss


def _assert_same_parameters(a, b, **tolerance):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


# --------------------------------------------------------------------------- references


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_pytorch_optimizer(adaptive):
    model, x, y = _task()
    reference_model = copy.deepcopy(model)
    rho = 0.5 if adaptive else 0.05
    base = rules.SGD(lr=0.1, momentum=0.9)
    ours = O.SAM(model.parameters(), base=base, rho=rho, adaptive=adaptive)
    theirs = po.SAM(
        reference_model.parameters(),
        torch.optim.SGD,
        rho=rho,
        adaptive=adaptive,
        lr=0.1,
        momentum=0.9,
    )
    for _ in range(10):
        ours.step(_closure(ours, model, x, y))
        closure = _closure(theirs, reference_model, x, y)
        closure()
        theirs.step(closure)
    # pytorch-optimizer sums the squared gradient norm in float32: agreement to ~1e-9, not 1e-15.
    _assert_same_parameters(model, reference_model, rtol=1e-6, atol=1e-8)


def test_lookahead_matches_pytorch_optimizer():
    model, x, y = _task()
    reference_model = copy.deepcopy(model)
    ours = O.Lookahead(model.parameters(), base=rules.Adam(lr=1e-2), k=3, alpha=0.4)
    theirs = po.Lookahead(torch.optim.Adam(reference_model.parameters(), lr=1e-2), k=3, alpha=0.4)
    for _ in range(11):
        for opt, net in ((ours, model), (theirs, reference_model)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    _assert_same_parameters(model, reference_model, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["swa", "ema"])
def test_weight_averaging_matches_torch_swa_utils(mode):
    model, x, y = _task()
    reference_model = copy.deepcopy(model)
    start, every, decay = 3, 2, 0.9
    ours = O.WeightAveraging(
        model.parameters(),
        base=rules.SGD(lr=0.05),
        mode=mode,
        start=start,
        every=every,
        decay=decay,
    )
    reference_opt = torch.optim.SGD(reference_model.parameters(), lr=0.05)
    kwargs = {"multi_avg_fn": get_ema_multi_avg_fn(decay)} if mode == "ema" else {}
    averaged = AveragedModel(reference_model, **kwargs)
    for step in range(12):
        for opt, net in ((ours, model), (reference_opt, reference_model)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
        if step >= start and (step - start) % every == 0:
            averaged.update_parameters(reference_model)
    _assert_same_parameters(model, reference_model, rtol=1e-12, atol=1e-14)
    for ours_average, theirs in zip(ours.averaged_parameters(), averaged.module.parameters()):
        torch.testing.assert_close(ours_average, theirs.detach(), rtol=1e-12, atol=1e-14)


def test_swapping_in_the_average_and_back():
    model, x, y = _task()
    opt = O.WeightAveraging(model.parameters(), base=rules.SGD(lr=0.1))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    training = [p.detach().clone() for p in model.parameters()]
    average = [a.clone() for a in opt.averaged_parameters()]
    with opt.averaged_weights():
        for p, a in zip(model.parameters(), average):
            torch.testing.assert_close(p.detach(), a)
    for p, t in zip(model.parameters(), training):
        torch.testing.assert_close(p.detach(), t)
    assert not all(torch.equal(t, a) for t, a in zip(training, average))


def test_entropy_sgd_without_noise_and_one_inner_step_is_scaled_sgd():
    """Alg. 1 with L = 1 and no noise: μ = θ - α η' ∇f(θ), so the step is SGD on γ α η' ∇f."""
    model, x, y = _task()
    loss = _functional(model, x, y)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    gamma, alpha, inner_lr, lr = 0.5, 0.75, 0.1, 0.2
    rule = wrappers.EntropySGD(
        base=rules.SGD(lr=lr),
        inner_steps=1,
        inner_lr=inner_lr,
        gamma=gamma,
        scoping=0.0,
        noise=0.0,
        alpha=alpha,
    )
    grads = torch.func.grad(loss)(params)
    updates, _ = rule.update(grads, rule.init(params), params, step=0, loss_fn=loss)
    for k, g in grads.items():
        torch.testing.assert_close(updates[k], -lr * gamma * alpha * inner_lr * g)


def test_perturbed_gradient_with_zero_noise_is_the_base_step():
    model, x, y = _task()
    loss = _functional(model, x, y)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    grads = torch.func.grad(loss)(params)
    for name in ("lpf_sgd", "smoothout"):
        rule = O.get(name, sigma=0.0, base=rules.Adam(lr=1e-2), samples=2)
        base = rules.Adam(lr=1e-2)
        ours, _ = rule.update(grads, rule.init(params), params, step=0, loss_fn=loss)
        theirs, _ = base.update(grads, base.init(params), params, step=0)
        for k in params:
            torch.testing.assert_close(ours[k], theirs[k])


def test_lpf_noise_scales_with_each_filters_norm_and_smoothout_is_uniform():
    torch.manual_seed(0)
    weight = torch.stack([torch.full((400,), 1.0), torch.full((400,), 3.0)])  # row norms 20, 60
    lpf = wrappers.PerturbedGradient(sigma=0.01)
    draws = torch.stack([lpf._perturbation(weight) for _ in range(50)])
    stds = draws.std(dim=(0, 2))
    torch.testing.assert_close(stds, torch.tensor([0.2, 0.6]), rtol=0.03, atol=0)
    smooth = O.get("smoothout", sigma=0.5)
    draws = torch.stack([smooth._perturbation(weight) for _ in range(50)])
    assert float(draws.abs().max()) <= 0.5 and float(draws.abs().max()) > 0.49
    torch.testing.assert_close(draws.var(), torch.tensor(0.25 / 3), rtol=0.03, atol=0)


def test_perturbed_gradient_averages_to_the_gradient_of_a_quadratic():
    # E[∇f(θ + ε)] = ∇f(θ) for a quadratic f and zero-mean noise.
    torch.manual_seed(0)
    a = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    params = {"w": torch.ones(5, dtype=torch.float64)}

    def loss(p):
        return 0.5 * p["w"] @ a @ p["w"]

    rule = wrappers.PerturbedGradient(base=rules.SGD(lr=1.0), samples=4000, sigma=0.1)
    grads = torch.func.grad(loss)(params)
    updates, _ = rule.update(grads, rule.init(params), params, step=0, loss_fn=loss)
    torch.testing.assert_close(-updates["w"], a @ params["w"], rtol=0.02, atol=0)


# --------------------------------------------------------------------------- contracts

WRAPPERS = ["lookahead", "sam", "asam", "entropy_sgd", "lpf_sgd", "smoothout", "swa", "ema"]
BASES = [rules.SGD(lr=0.05, momentum=0.9), rules.Adam(lr=1e-2)]


@pytest.mark.parametrize("base", BASES, ids=["sgd", "adam"])
@pytest.mark.parametrize("name", WRAPPERS)
def test_every_wrapper_composes_with_sgd_and_adam_and_decreases_the_loss(name, base):
    torch.manual_seed(0)
    model, x, y = _task()
    if name == "entropy_sgd" and isinstance(base, rules.SGD):
        # Its gradient γ(θ - μ) is about γ·η'·L ≈ 0.015 of the loss's: the paper's SGD uses lr 1.
        base = base.replace(lr=1.0)
    opt = O.get_class(name)(model.parameters(), base=base)
    closure = _closure(opt, model, x, y)
    first = float(closure())
    for _ in range(30):
        opt.step(closure)
    assert float(closure()) < 0.8 * first
    assert opt.rule.base == base


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_lr_reaches_the_base_and_schedulers_work(name):
    model, x, y = _task()
    opt = O.get_class(name)(model.parameters(), base=rules.SGD(lr=0.05), lr=0.2)
    assert opt.rule.base.lr == 0.2 and opt.param_groups[0]["lr"] == 0.2
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(_closure(opt, model, x, y))
    scheduler.step()
    assert opt._group_rule(opt.param_groups[0]).base.lr == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["lookahead", "sam", "swa", "lpf_sgd"])
def test_wrapper_under_vmap_equals_a_loop(name):
    model, x, y = _task()
    loss = _functional(model, x, y)
    rule = O.get(name, base=rules.Adam(lr=1e-2))
    population = [{k: v.detach() + 0.1 * i for k, v in model.named_parameters()} for i in range(3)]

    def run(params, seed_offset=0):
        state = rule.init(params)
        for step in range(6):
            grads = torch.func.grad(loss)(params)
            updates, state = rule.update(grads, state, params, step=step, loss_fn=loss)
            params = apply_updates(params, updates)
        return params

    if name == "lpf_sgd":  # noise: compare the deterministic limit
        rule = O.get(name, base=rules.Adam(lr=1e-2), sigma=0.0)
    stacked = {k: torch.stack([p[k] for p in population]) for k in population[0]}
    batched = torch.func.vmap(run, randomness="different")(stacked)
    for i, params in enumerate(population):
        looped = run(params)
        for k in looped:
            torch.testing.assert_close(batched[k][i], looped[k], rtol=1e-10, atol=1e-12)


def test_wrapper_refuses_a_base_that_needs_the_loss():
    with pytest.raises(TypeError, match="first-order rule"):
        wrappers.SAM(base=O.get("lbfgs"))
    with pytest.raises(TypeError, match="UpdateRule"):
        wrappers.Lookahead(base=torch.optim.SGD)


@pytest.mark.parametrize("name", ["entropy_sgd", "lpf_sgd", "sam"])
def test_wrappers_that_probe_the_loss_run_inside_a_vmapped_unroll(name):
    """The meta-training / l2o-eval unroll hands them the task's loss; noise is drawn per member."""
    torch.manual_seed(0)
    task = Quadratic(fixed=True)  # every member is the same problem from the same point
    lr = 20.0 if name == "entropy_sgd" else 0.3
    rule = O.get(name, base=rules.SGD(lr=lr))
    carry = init_carry(rule, task, torch.tensor([1, 2, 3]))
    out = unroll(rule, task, carry, 8)
    assert torch.isfinite(out.losses).all()
    assert (out.losses[-1] < out.losses[0]).all()
    w = out.carry["params"]["w"]
    # Only the noise-drawing rules move identical members apart: noise is drawn per member.
    assert torch.equal(w[0], w[1]) == (name == "sam")
