"""Shared by the tests of the learned rules and their fused steps: trajectories of a rule's
updates, tree comparisons, vmap against a Python loop, the shapes sent to the fused path, and a
differentiable unrolled loss for meta-gradients."""

from __future__ import annotations

import dataclasses

import torch
from torch.func import vmap


def trajectory(update, rule, params, steps: int = 5, seed: int = 0):
    """Updates and states along ``steps`` updates on gradients of widely varying scale."""
    g = torch.Generator().manual_seed(seed)
    state = rule.init(params)
    out = []
    for t in range(steps):
        grads = {
            k: torch.randn(p.shape, generator=g, dtype=p.dtype) * 10.0 ** (2 * t - 4)
            for k, p in params.items()
        }
        updates, state = update(grads, state, params, step=t)
        out.append((updates, state))
        params = {k: params[k] + updates[k] for k in params}
    return out


def assert_trees_close(a, b, **tol):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_trees_close(a[k], b[k], **tol)
    else:
        torch.testing.assert_close(a, b, **tol)


def max_abs(tree) -> float:
    return max(float(t.abs().max()) for t in tree.values() if t.numel())


def unrolled_loss(rule_update, rule, params, steps: int = 4):
    """Sum of the losses of a diagonal quadratic along an unroll (differentiable)."""
    curvature = {k: torch.linspace(0.5, 3.0, p.numel(), dtype=p.dtype) for k, p in params.items()}
    state = rule.init(params)
    total = 0.0
    for t in range(steps):
        grads = {k: curvature[k].reshape(p.shape) * p for k, p in params.items()}
        total = total + sum(0.5 * (grads[k] * p).sum() for k, p in params.items())
        updates, state = rule_update(grads, state, params, step=t)
        params = {k: params[k] + updates[k] for k in params}
    return total


def assert_fused_trajectory_equals_reference(reference, fused, shapes, *, rtol, atol_scale):
    """A few steps of ``fused.fused_update`` against ``reference.reference_update`` on one
    seeded tensor of each shape: updates to ``rtol`` and ``atol_scale`` times the largest
    reference update, accumulators exactly (the same elementwise ops)."""
    g = torch.Generator().manual_seed(1)
    params = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    expected = trajectory(reference.reference_update, reference, params)
    got = trajectory(fused.fused_update, fused, params)
    for (u_ref, s_ref), (u_fused, s_fused) in zip(expected, got, strict=True):
        assert_trees_close(u_fused, u_ref, rtol=rtol, atol=atol_scale * max_abs(u_ref))
        assert_trees_close(s_fused, s_ref, rtol=0, atol=0)


def fused_and_reference_meta_gradients(lopt, lr: float):
    """``(names, reference, fused)``: the meta-gradients of :func:`unrolled_loss` in float64
    through ``reference_update`` and ``fused_update`` of ``lopt``'s rule at initialisation,
    on a matrix, a conv kernel and a vector, with blocks (``chunk_size=10``) smaller than each."""
    meta = {
        k: v.double().requires_grad_()
        for k, v in lopt.init_meta(torch.Generator().manual_seed(0)).items()
    }
    g = torch.Generator().manual_seed(3)
    params = {
        "w": torch.randn(7, 6, generator=g, dtype=torch.float64),
        "conv": torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(13, generator=g, dtype=torch.float64),
    }
    rule = dataclasses.replace(lopt.rule(meta, lr=lr), chunk_size=10)
    ref = torch.autograd.grad(unrolled_loss(rule.reference_update, rule, params), meta.values())
    fused = torch.autograd.grad(unrolled_loss(rule.fused_update, rule, params), meta.values())
    return list(meta), ref, fused


def _stack(trees: list[dict]) -> dict:
    return {k: torch.stack([t[k] for t in trees]) for k in trees[0]}


def assert_vmapped_update_equals_loop(batched_update, update, rule, population, grads, **tol):
    """``batched_update`` vmapped over a population of parameter dicts (with their gradients,
    at steps 0, 3, 50 and 4000) equals ``update`` run on each member alone."""
    steps = torch.tensor([0, 3, 50, 4000])

    def one(g, state, params, step):
        return batched_update(g, state, params, step=step)

    stacked = _stack(population)
    batched, _ = vmap(one)(_stack(grads), vmap(rule.init)(stacked), stacked, steps)
    for i, params in enumerate(population):
        expected, _ = update(grads[i], rule.init(params), params, step=int(steps[i]))
        for k in expected:
            torch.testing.assert_close(batched[k][i], expected[k], **tol)


def shapes_sent_to(
    method_name: str, rule, monkeypatch, compiled: bool = False
) -> list[tuple[int, ...]]:
    """The tensor shapes ``rule.update`` sends to its method ``method_name`` (whose first
    argument is the gradient) on a 4x5 matrix, a 3x7 matrix and a 21-vector, called as it is
    or inside ``torch.compile`` (``compiled``)."""
    seen = []
    original = getattr(type(rule), method_name)

    def spy(self, g, *args):
        seen.append(tuple(g.shape))
        return original(self, g, *args)

    params = {"small": torch.randn(4, 5), "large": torch.randn(3, 7), "vector": torch.randn(21)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}

    def update(grads, state, params):
        return rule.update(grads, state, params, step=0)

    with monkeypatch.context() as patch:  # undone on return: calls do not stack spies
        patch.setattr(type(rule), method_name, spy)
        # Dynamo's own backend runs the traced graph as it is (no Inductor compile).
        (torch.compile(update, backend="eager") if compiled else update)(
            grads, rule.init(params), params
        )
    return seen
