"""Shared by the tests of the fused learned steps against their references: trajectories of
a rule's updates, tree comparisons, and a differentiable unrolled loss for meta-gradients."""

from __future__ import annotations

import torch


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
