"""AdaFisher: its Kronecker-factor statistics against direct autograd computations, its
preconditioner against torch.kron, and the torch.optim class against the rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from l2o.optim import adafisher
from l2o.optim.adafisher import AdaFisher, AdaFisherOptimizer, ModuleLoss, layers_of
from l2o.optim.base import apply_updates


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (10,), generator=g)


def _module_loss(model, x, y):
    def fn(params):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return ModuleLoss(model, fn)


def test_statistics_are_the_diagonals_of_the_activation_and_output_gradient_covariances():
    model, (x, y) = _net(), _data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    factors = _module_loss(model, x, y).kronecker_factors(params)
    # Direct: the layers' inputs and output gradients from a plain autograd pass.
    h1 = x
    z1 = model[0](h1)
    z1.retain_grad()
    h2 = torch.tanh(z1)
    z2 = model[2](h2)
    z2.retain_grad()
    nn.functional.cross_entropy(z2, y).backward()
    h1_bar = torch.cat([h1, torch.ones(10, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(factors["0.weight"][0], (h1_bar**2).mean(0))
    torch.testing.assert_close(factors["0.weight"][1], (z1.grad**2).mean(0))
    torch.testing.assert_close(factors["2.weight"][0], (h2.detach() ** 2).mean(0))
    torch.testing.assert_close(factors["2.weight"][1], (z2.grad**2).mean(0))


def test_conv_statistics_average_over_patches_and_positions():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    h = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    padded = nn.functional.pad(h, (1, 1, 1, 1))
    patches = [
        padded[b, :, i : i + 3, j : j + 3].reshape(-1)
        for b in range(2)
        for i in range(5)
        for j in range(5)
    ]
    rows = torch.stack([torch.cat([p, torch.ones(1, dtype=torch.float64)]) for p in patches])
    torch.testing.assert_close(adafisher.input_statistic(conv, h), (rows**2).mean(0))
    s = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(adafisher.output_statistic(conv, s), (s**2).mean(dim=(0, 2, 3)))


def test_preconditioner_is_the_diagonal_of_the_kronecker_product_plus_damping():
    model = _net()
    params = {k: v.detach() for k, v in model.named_parameters()}
    rule = AdaFisher.for_module(model, damping=0.01)
    state = rule.init(params)
    state["input_factor"]["0.weight"] = torch.rand(5, dtype=torch.float64)
    state["output_factor"]["0.weight"] = torch.rand(6, dtype=torch.float64)
    fisher = rule.preconditioner(state, params)
    h, s = state["input_factor"]["0.weight"], state["output_factor"]["0.weight"]
    # Row-major [out, in+1]: entry (i, j) of diag(S ⊗ H) is s_i h_j.
    kron = torch.kron(torch.diag(s), torch.diag(h)).diagonal().reshape(6, 5) + 0.01
    torch.testing.assert_close(fisher["0.weight"], kron[:, :4])
    torch.testing.assert_close(fisher["0.bias"], kron[:, 4])
    assert torch.equal(fisher["2.weight"], 0.01 + torch.ones(3, 6, dtype=torch.float64))


def test_class_with_hooks_follows_the_rule_with_module_loss():
    model, (x, y) = _net(), _data()
    reference = copy.deepcopy(model)
    opt = AdaFisherOptimizer(model, lr=0.05, update_period=2, weight_decay=1e-3)
    rule = AdaFisher.for_module(reference, lr=0.05, update_period=2, weight_decay=1e-3)
    params = {k: v.detach().clone() for k, v in reference.named_parameters()}
    state = rule.init(params)
    loss_fn = _module_loss(reference, x, y)
    for step in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        grads = torch.func.grad(loss_fn.fn)(params)
        updates, state = rule.update(grads, state, params, step=step, loss_fn=loss_fn)
        params = apply_updates(params, updates)
    for (k, p), q in zip(params.items(), model.parameters()):
        torch.testing.assert_close(q.detach(), p, msg=k)
    # The factors moved away from their initial ones at steps 0, 2 and 4.
    assert not torch.equal(state["input_factor"]["0.weight"], torch.ones(5, dtype=torch.float64))


def test_adafisher_trains_a_small_cnn_and_adafisher_w_decays_weights():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)
    ).double()
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    opt = AdaFisherOptimizer(model, lr=0.01, update_period=5)
    first = float(nn.functional.cross_entropy(model(x), y).detach())
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert float(nn.functional.cross_entropy(model(x), y).detach()) < 0.8 * first
    assert layers_of(model) == (("0.weight", "0.bias"), ("3.weight", "3.bias"))
    decayed = AdaFisher(lr=0.1, weight_decay=0.5, decoupled_weight_decay=True)
    p = {"w": torch.ones(3, dtype=torch.float64)}
    grads = {"w": torch.zeros(3, dtype=torch.float64)}
    updates, _ = decayed.update(grads, decayed.init(p), p, step=0)
    torch.testing.assert_close(updates["w"], torch.full((3,), -0.05, dtype=torch.float64))


def test_adafisher_needs_the_model_and_its_statistics():
    with pytest.raises(TypeError, match="takes the model"):
        AdaFisherOptimizer(_net().parameters())
    model = _net()
    rule = AdaFisher.for_module(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    with pytest.raises(TypeError, match="ModuleLoss"):
        rule.update(params, rule.init(params), params, step=0, loss_fn=lambda p: 0.0)
