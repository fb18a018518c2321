"""The benchmark's unroll in JAX, ``jit(vmap(lax.scan))`` as learned_optimization runs it.

A port, for ``scripts/bench_meta_train.py --jax`` only, of exactly what the l2o side runs: the
``mlp`` learned optimizer's reference update (``l2o.learned.mlp_lopt``: Adafactor-style
features normalised per tensor, the tanh step embedding, the per-coordinate MLP, the
``-d exp(λ_exp a) λ_step`` output) on a ReLU MLP classifier with mean cross-entropy. Initial
parameters and minibatches come from the l2o task, so both sides train the same instances on the
same data, and :func:`check_same_losses` compares their inner losses before anything is timed.
Needs the optional ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from l2o.learned.features import factored_dims
from l2o.learned.mlp_lopt import NORMALIZE_EPS, RSQRT_EPS, MLPLOpt


def to_jax(tree: dict[str, torch.Tensor]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in tree.items()}


class JaxUnroll:
    """The inner training of ``task`` (an ``l2o`` MLP classifier task) under ``lopt``.

    Args:
        lopt: the ``mlp`` learned optimizer (its config; its meta-parameters are passed in).
        layer_names: the task's parameter names in forward order (``0.weight``, ``0.bias``, ...).
        shapes: their shapes (torch layout: Linear weights are ``[out, in]``).
    """

    def __init__(
        self, lopt: MLPLOpt, layer_names: Sequence[str], shapes: Sequence[tuple[int, ...]]
    ):
        self.lopt = lopt
        self.names = list(layer_names)
        self.shapes = [tuple(s) for s in shapes]
        self.decays = {g: jnp.asarray(d, dtype=jnp.float32) for g, d in lopt.decays.items()}
        self.timescales = jnp.asarray(lopt.step_timescales, dtype=jnp.float32)

    # -- the inner task --------------------------------------------------------------------

    def loss(self, params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        h = x
        weights = [n for n in self.names if n.endswith("weight")]
        for i, name in enumerate(weights):
            h = h @ params[name].T + params[name.replace("weight", "bias")]
            if i < len(weights) - 1:
                h = jax.nn.relu(h)
        log_p = jax.nn.log_softmax(h, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=-1))

    # -- the learned optimizer -------------------------------------------------------------

    def init_state(self, params: dict) -> dict:
        k, r, f = (len(self.lopt.decays[g]) for g in ("momentum", "rms", "adafactor"))
        state = {"m": {}, "v": {}, "row": {}, "col": {}}
        for name, shape in zip(self.names, self.shapes, strict=True):
            state["m"][name] = jnp.zeros((*shape, k))
            state["v"][name] = jnp.zeros((*shape, r))
            dims = factored_dims(shape)
            if dims is None:
                state["row"][name] = jnp.zeros((*shape, f))
                state["col"][name] = jnp.zeros((0,))
            else:
                row_dim, col_dim = dims
                state["row"][name] = jnp.zeros((*np.delete(shape, col_dim), f))
                state["col"][name] = jnp.zeros((*np.delete(shape, row_dim), f))
        return state

    @staticmethod
    def _ema(average, value, decay):
        return value + decay * (average - value)  # torch.lerp(value, average, decay)

    def _tensor_update(self, meta, g, p, m, v, row, col, shape, step):
        g1, g2 = g[..., None], (g * g)[..., None]
        m = self._ema(m, g1, self.decays["momentum"])
        v = self._ema(v, g2, self.decays["rms"])
        dims = factored_dims(shape)
        if dims is None:
            row = self._ema(row, g2, self.decays["adafactor"])
            v_hat = row_feat = col_feat = row
            rsqrt_row = rsqrt_col = lax.rsqrt(row + RSQRT_EPS)
        else:
            row_dim, col_dim = dims
            row = self._ema(row, jnp.mean(g2, axis=col_dim), self.decays["adafactor"])
            col = self._ema(col, jnp.mean(g2, axis=row_dim), self.decays["adafactor"])
            row_mean = jnp.mean(row, axis=row_dim, keepdims=True)
            v_hat = jnp.expand_dims(row / (row_mean + RSQRT_EPS), col_dim) * jnp.expand_dims(
                col, row_dim
            )
            full = v_hat.shape
            row_feat = jnp.broadcast_to(jnp.expand_dims(row, col_dim), full)
            col_feat = jnp.broadcast_to(jnp.expand_dims(col, row_dim), full)
            rsqrt_row = jnp.broadcast_to(jnp.expand_dims(lax.rsqrt(row + RSQRT_EPS), col_dim), full)
            rsqrt_col = jnp.broadcast_to(jnp.expand_dims(lax.rsqrt(col + RSQRT_EPS), row_dim), full)
        rsqrt_v = lax.rsqrt(v + RSQRT_EPS)
        rsqrt_v_hat = lax.rsqrt(v_hat + RSQRT_EPS)
        feats = jnp.concatenate(
            [
                g1,
                p[..., None],
                m,
                v,
                m * rsqrt_v[..., -1:],
                rsqrt_v,
                row_feat,
                col_feat,
                rsqrt_row,
                rsqrt_col,
                g1 * rsqrt_v_hat,
                m * rsqrt_v_hat[..., -1:],
            ],
            axis=-1,
        ).reshape(-1, self.lopt.num_features)
        x = feats * lax.rsqrt(jnp.mean(feats * feats, axis=0, keepdims=True) + NORMALIZE_EPS)
        embedding = jnp.tanh(step / self.timescales - 1.0)
        h = jnp.concatenate([x, jnp.broadcast_to(embedding, (x.shape[0], embedding.shape[0]))], 1)
        layers = len(self.lopt.hidden_sizes) + 1
        for i in range(layers):
            h = h @ meta[f"w{i}"] + meta[f"b{i}"]
            if i < layers - 1:
                h = jax.nn.relu(h)
        delta = -h[:, 0] * jnp.exp(h[:, 1] * self.lopt.exp_mult) * self.lopt.step_mult
        return delta.reshape(shape), m, v, row, col

    def _update(self, meta, grads, state, params, step):
        new = {"m": {}, "v": {}, "row": {}, "col": {}}
        updates = {}
        for name, shape in zip(self.names, self.shapes, strict=True):
            updates[name], *slots = self._tensor_update(
                meta,
                grads[name],
                params[name],
                state["m"][name],
                state["v"][name],
                state["row"][name],
                state["col"][name],
                shape,
                step,
            )
            for slot, value in zip(("m", "v", "row", "col"), slots, strict=True):
                new[slot][name] = value
        return updates, new

    # -- the unroll --------------------------------------------------------------------------

    def member_unroll(self, meta, params, xs, ys):
        """K inner steps of one instance from step 0: ``lax.scan`` over its K minibatches.
        Returns the K training losses (at the parameters each gradient was taken at)."""

        def inner_step(carry, batch):
            params, state, step = carry
            x, y = batch
            loss, grads = jax.value_and_grad(self.loss)(params, x, y)
            updates, state = self._update(meta, grads, state, params, step)
            params = {k: params[k] + updates[k] for k in params}
            return (params, state, step + 1.0), loss

        carry = (params, self.init_state(params), jnp.zeros((), jnp.float32))
        _, losses = lax.scan(inner_step, carry, (xs, ys))
        return losses

    def forward(self):
        """``jit(vmap(member_unroll))`` with per-member meta-parameters (the ES/PES path)."""
        return jax.jit(jax.vmap(self.member_unroll))

    def tbptt(self):
        """Meta-gradient of the population's mean training loss w.r.t. shared meta-params."""

        def meta_loss(meta, params, xs, ys):
            losses = jax.vmap(self.member_unroll, in_axes=(None, 0, 0, 0))(meta, params, xs, ys)
            return jnp.mean(losses)

        return jax.jit(jax.grad(meta_loss))


def population_inputs(task, seeds: Sequence[int], steps: int):
    """The l2o task's initial parameters ``{name: [P, ...]}`` and minibatches
    ``xs [P, K, B, D]``, ``ys [P, K, B]`` for ``seeds``, as JAX arrays."""
    params = to_jax(task.population_init(list(seeds)))
    batches = [[task.batch(s, k) for k in range(steps)] for s in seeds]
    xs = jnp.asarray(np.stack([[b[0].cpu().numpy() for b in member] for member in batches]))
    ys = jnp.asarray(np.stack([[b[1].cpu().numpy() for b in member] for member in batches]))
    return params, xs, ys


def check_same_losses(
    jax_losses: jax.Array, l2o_losses: torch.Tensor, steps: int = 5, rtol: float = 1e-4
) -> float:
    """Raise unless the JAX unroll's ``[P, K]`` losses equal l2o's ``[K, P]`` ones over the
    first ``steps`` inner steps; return the largest relative difference over all K.

    Only the first steps are held to a tolerance: the two frameworks round differently, and a
    learned optimizer's trajectory can amplify a last-bit difference into a percent-sized one
    within 20 steps (seen here on one of 8 members), which says nothing about the port."""
    got, expected = np.asarray(jax_losses), l2o_losses.detach().cpu().numpy().T
    np.testing.assert_allclose(got[:, :steps], expected[:, :steps], rtol=rtol, atol=1e-6)
    return float(np.max(np.abs(got - expected) / np.abs(expected)))


__all__ = ["JaxUnroll", "check_same_losses", "population_inputs", "to_jax"]
