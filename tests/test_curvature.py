"""AdaHessian, Sophia and INNA: against pytorch-optimizer, exact Hessians and the published
update formulas."""

from __future__ import annotations

import copy

import pytest
import pytorch_optimizer as po
import torch

import l2o.optim as O
from l2o.optim import curvature
from l2o.optim.base import FunctionalLoss, apply_updates

pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")


def _task(seed: int = 0, classes: int = 0):
    torch.manual_seed(seed)
    out = classes or 1
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, out)
    ).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, classes, (40,)) if classes else torch.sin(x.sum(1, keepdim=True))
    return model, x, y


def _loss(model, x, y):
    out = model(x)
    if out.shape[1] > 1:
        return torch.nn.functional.cross_entropy(out, y)
    return torch.nn.functional.mse_loss(out, y)


def _closure(opt, model, x, y, create_graph=True):
    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def test_adahessian_matches_pytorch_optimizer():
    model, x, y = _task()
    reference_model = copy.deepcopy(model)
    ours = O.AdaHessian(model.parameters(), lr=0.05, weight_decay=1e-2)
    theirs = po.AdaHessian(reference_model.parameters(), lr=0.05, weight_decay=1e-2)
    for step in range(8):
        torch.manual_seed(100 + step)  # the same Rademacher probes on both sides
        ours.step(_closure(ours, model, x, y))
        torch.manual_seed(100 + step)
        _closure(theirs, reference_model, x, y)()
        theirs.step()
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)


def test_hutchinson_estimate_converges_to_the_exact_hessian_diagonal():
    model, x, y = _task()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return _loss_functional(model, p, x, y)

    flat_keys = list(params)
    sizes = [params[k].numel() for k in flat_keys]

    def flat_loss(flat):
        pieces = torch.split(flat, sizes)
        return loss({k: t.reshape(params[k].shape) for k, t in zip(flat_keys, pieces)})

    exact = torch.func.hessian(flat_loss)(torch.cat([params[k].reshape(-1) for k in flat_keys]))
    torch.manual_seed(0)
    estimate = curvature.hutchinson_diagonal(FunctionalLoss(loss), params, samples=4000)
    flat_estimate = torch.cat([estimate[k].reshape(-1) for k in flat_keys])
    diagonal = exact.diagonal()
    # The estimator's variance is the sum of squared off-diagonal entries per row.
    error = (flat_estimate - diagonal).norm() / diagonal.norm()
    assert error < 0.05
    few = curvature.hutchinson_diagonal(FunctionalLoss(loss), params, samples=4)
    flat_few = torch.cat([few[k].reshape(-1) for k in flat_keys])
    assert (flat_few - diagonal).norm() / diagonal.norm() > error  # more probes, less error


def _loss_functional(model, params, x, y):
    out = torch.func.functional_call(model, params, (x,))
    if out.shape[1] > 1:
        return torch.nn.functional.cross_entropy(out, y)
    return torch.nn.functional.mse_loss(out, y)


def test_adahessian_spatially_averages_conv_kernels():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in conv.named_parameters()}

    def loss(p):
        return torch.func.functional_call(conv, p, (x,)).tanh().pow(2).mean()

    rule = curvature.AdaHessian()
    torch.manual_seed(1)
    diagonal = rule._diagonal(FunctionalLoss(loss), params)
    w = diagonal["weight"]
    assert torch.equal(w, w[:, :, :1, :1].expand_as(w))  # one value per kernel
    torch.manual_seed(1)
    raw = curvature.hutchinson_diagonal(FunctionalLoss(loss), params)["weight"]
    torch.testing.assert_close(w[:, :, 0, 0], raw.abs().mean(dim=(2, 3)))


def test_sophia_step_is_the_clipped_preconditioned_momentum():
    """Alg. 3 of Liu et al. written out for one update with a fresh estimate."""
    model, x, y = _task()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return _loss_functional(model, p, x, y)

    rule = curvature.Sophia(lr=0.01, rho=0.05, weight_decay=0.1, update_period=1)
    grads = torch.func.grad(loss)(params)
    torch.manual_seed(3)
    updates, state = rule.update(grads, rule.init(params), params, step=0, loss_fn=loss)
    torch.manual_seed(3)
    estimate = curvature.hutchinson_diagonal(FunctionalLoss(loss), params)
    b1, b2 = rule.betas
    for k, g in grads.items():
        m, h = (1 - b1) * g, (1 - b2) * estimate[k]
        ratio = torch.clamp(m.abs() / torch.clamp(0.05 * h, min=1e-15), max=1.0)
        expected = -0.01 * 0.1 * params[k] - 0.01 * torch.sign(m) * ratio
        torch.testing.assert_close(updates[k], expected)
        # Every weight moves by at most lr (plus its weight decay).
        assert (updates[k] + 0.01 * 0.1 * params[k]).abs().max() <= 0.01 + 1e-15
    torch.testing.assert_close(state["hessian"], {k: (1 - b2) * e for k, e in estimate.items()})


def test_sophia_reuses_its_estimate_between_updates():
    model, x, y = _task()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    calls = []

    def loss(p):
        return _loss_functional(model, p, x, y)

    class Counting(FunctionalLoss):
        def hvp(self, params, vector):
            calls.append(1)
            return super().hvp(params, vector)

    rule = curvature.Sophia(update_period=3)
    state = rule.init(params)
    for step in range(7):
        grads = torch.func.grad(loss)(params)
        updates, state = rule.update(grads, state, params, step=step, loss_fn=Counting(loss))
        params = apply_updates(params, updates)
    assert len(calls) == 3  # steps 0, 3 and 6


def test_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal():
    """B·E[ĝ⊙ĝ] with labels drawn from the model is the diagonal of the Gauss–Newton matrix
    (1/B) Σ_b J_bᵀ (diag(p_b) - p_b p_bᵀ) J_b of the mean cross-entropy."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    keys = list(params)

    def logits_fn(p):
        return torch.func.functional_call(model, p, (x,))

    gnb = curvature.GNBLoss(logits_fn, torch.zeros(5, dtype=torch.long))
    samples = [gnb.gnb_diagonal(params) for _ in range(6000)]
    estimate = torch.cat([torch.stack([s[k] for s in samples]).mean(0).reshape(-1) for k in keys])

    def flat_logits(flat):
        w, b = flat[:12].reshape(4, 3), flat[12:]
        return x @ w.T + b

    flat = torch.cat([params[k].reshape(-1) for k in keys])
    jacobian = torch.func.jacrev(flat_logits)(flat)  # [B, C, n]
    probs = torch.softmax(flat_logits(flat), dim=1)
    gn = (
        sum(
            jacobian[b].T @ (torch.diag(probs[b]) - torch.outer(probs[b], probs[b])) @ jacobian[b]
            for b in range(5)
        )
        / 5
    )
    torch.testing.assert_close(estimate, gn.diagonal(), rtol=0.1, atol=1e-3)


@pytest.mark.parametrize("name", ["sophia", "sophia_g"])
def test_sophia_classes_train_a_classifier(name):
    model, x, y = _task(classes=3)
    opt = O.get_class(name)(model.parameters(), lr=0.05, update_period=2)
    logits = (lambda: model(x)) if name == "sophia_g" else None
    closure = _closure(opt, model, x, y, create_graph=name == "sophia")
    first = float(closure().detach())
    for _ in range(40):
        opt.step(closure, logits_closure=logits)
    assert float(closure().detach()) < 0.75 * first


def test_sophia_g_without_a_label_sampler_says_what_it_needs():
    rule = O.get("sophia_g")
    params = {"w": torch.ones(3)}
    with pytest.raises(TypeError, match="GNBLoss"):
        rule.update(
            {"w": torch.ones(3)}, rule.init(params), params, step=0, loss_fn=lambda p: p["w"].sum()
        )


def test_inna_first_step_is_gradient_descent_with_the_initial_speed():
    """ψ_0 = (1 - αβ)θ_0 - (β² - βv₀)g_0 gives θ_1 = θ_0 - γ v₀ g_0 (Castera et al.)."""
    params = {"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}
    grads = {"w": torch.tensor([0.3, 0.5], dtype=torch.float64)}
    rule = curvature.INNA(lr=0.1, alpha=0.5, beta=0.2, initial_speed=1.5)
    updates, _ = rule.update(grads, rule.init(params), params, step=0)
    torch.testing.assert_close(updates["w"], -0.1 * 1.5 * grads["w"])


def test_inna_follows_the_papers_recursion_and_converges_on_a_quadratic():
    h = torch.tensor([1.0, 10.0], dtype=torch.float64)

    def loss(p):
        return 0.5 * (h * (p["w"] - 1.0) ** 2).sum()

    rule = curvature.INNA(lr=0.05, alpha=1.0, beta=0.1)
    theta = torch.tensor([3.0, -1.0], dtype=torch.float64)
    params, state = {"w": theta}, rule.init({"w": theta})
    a, b, gamma = 1.0, 0.1, 0.05
    psi = (1 - a * b) * theta
    for step in range(1500):
        grads = torch.func.grad(loss)(params)
        g = grads["w"]
        if step == 0:
            psi = psi - (b * b - b * 1.0) * g
        theta, psi = (
            theta + gamma * ((1 / b - a) * theta - psi / b - b * g),
            psi + gamma * ((1 / b - a) * theta - psi / b),
        )
        updates, state = rule.update(grads, state, params, step=step)
        params = apply_updates(params, updates)
        if step < 5:
            torch.testing.assert_close(params["w"], theta)
    torch.testing.assert_close(params["w"], torch.ones(2, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["adahessian", "sophia", "inna"])
def test_curvature_rules_run_under_vmap(name):
    model, x, y = _task()

    def loss(p):
        return _loss_functional(model, p, x, y)

    rule = O.get(name)
    base = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: torch.stack([v, v + 0.1]) for k, v in base.items()}

    def run(params):
        state = rule.init(params)
        for step in range(3):
            grads = torch.func.grad(loss)(params)
            updates, state = rule.update(grads, state, params, step=step, loss_fn=loss)
            params = apply_updates(params, updates)
        return params

    out = torch.func.vmap(run, randomness="different")(stacked)
    assert all(torch.isfinite(v).all() for v in out.values())
    if name == "inna":  # deterministic: equal to the loop
        for i, shift in enumerate((0.0, 0.1)):
            looped = run({k: v + shift for k, v in base.items()})
            for k in looped:
                torch.testing.assert_close(out[k][i], looped[k])
