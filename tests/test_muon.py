"""Muon and its Newton–Schulz iteration, against torch.optim.Muon and the SVD's polar factor."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap

import l2o.optim as O
from l2o.optim.muon import Muon, newton_schulz


def _matrix(rows, cols, seed=0, dtype=torch.float32):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 32)])
def test_newton_schulz_approaches_the_polar_factor_of_the_svd(shape):
    m = _matrix(*shape)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    polar = u @ vh  # the orthogonal factor U Vᵀ
    out = newton_schulz(m, dtype=torch.float32)
    singular = torch.linalg.svdvals(out)
    # Jordan et al.'s coefficients: singular values pushed into about [0.7, 1.2], not to 1.
    assert float(singular.min()) > 0.6 and float(singular.max()) < 1.25
    cosine = (out * polar).sum() / (out.norm() * polar.norm())
    assert float(cosine) > 0.97
    # With many more steps of the classical cubic iteration (a=1.5, b=-0.5, c=0) it converges.
    exact = newton_schulz(m, coefficients=(1.5, -0.5, 0.0), steps=60, dtype=torch.float64)
    torch.testing.assert_close(exact, polar.double(), rtol=0, atol=1e-6)


def test_newton_schulz_vmaps_and_differentiates():
    stack = torch.stack([_matrix(6, 4, s) for s in range(3)])
    batched = vmap(lambda m: newton_schulz(m, dtype=None))(stack)
    for i in range(3):
        torch.testing.assert_close(batched[i], newton_schulz(stack[i], dtype=None))
    m = _matrix(5, 3, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: newton_schulz(x, steps=3, dtype=None), (m,))


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_matrices_follow_torch_optim_muon(nesterov, adjust):
    torch.manual_seed(0)
    weights = [torch.randn(12, 7), torch.randn(5, 12)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust)
    opt, ref = O.Muon(ours, **kw), torch.optim.Muon(theirs, **kw)
    x = torch.randn(32, 7)
    for _ in range(10):
        for params, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            (torch.tanh(x @ params[0].T) @ params[1].T).pow(2).mean().backward()
            o.step()
        for p, q in zip(ours, theirs):
            # The same bfloat16 orthogonalisation; only the last float32 rounding may differ.
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_conv_weights_are_reshaped_and_vectors_go_to_the_other_rule():
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    bias = torch.nn.Parameter(torch.randn(4))
    kw = dict(lr=0.1, weight_decay=0.0, ns_dtype="float64", other=O.rules.SGD(lr=0.5))
    opt = O.Muon([conv, bias], **kw)
    conv.grad, bias.grad = torch.randn_like(conv), torch.randn_like(bias)
    before_conv, before_bias, grad = conv.detach().clone(), bias.detach().clone(), conv.grad.clone()
    opt.step()
    torch.testing.assert_close(bias.detach(), before_bias - 0.5 * bias.grad)  # plain SGD
    # First step, nesterov: direction = (1-μ)g + μ(1-μ)g ∝ g; its orthogonalisation is the
    # reshaped gradient's, scaled by sqrt(max(1, 4 / 27)) = 1.
    expected = newton_schulz(grad.reshape(4, -1), dtype=torch.float64).float().reshape(conv.shape)
    torch.testing.assert_close(conv.detach(), before_conv - 0.1 * expected, rtol=0, atol=1e-6)
    assert set(opt.state[conv]) >= {"momentum_buffer"} and "momentum_buffer" not in opt.state[bias]
    # state_dict round trip, slots per parameter
    again = O.Muon([conv, bias], **kw)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[conv]["momentum_buffer"], opt.state[conv]["momentum_buffer"])


def test_the_rule_vmaps_over_a_population_and_is_registered():
    rule = O.get("muon", lr=0.05, ns_dtype="float32")
    assert isinstance(rule, Muon) and O.get_class("muon") is O.Muon
    params = {"w": torch.randn(3, 6, 4), "b": torch.randn(3, 4)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = vmap(rule.init)(params)
    updates, _ = vmap(lambda g, s, p: rule.update(g, s, p, step=0))(grads, state, params)
    single = {k: v[1] for k, v in params.items()}
    one, _ = rule.update({k: v[1] for k, v in grads.items()}, rule.init(single), single, step=0)
    for k in params:
        torch.testing.assert_close(updates[k][1], one[k])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        O.get("muon", adjust_lr_fn="sqrt")
