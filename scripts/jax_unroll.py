"""The benchmark's unroll in JAX, ``jit(vmap(lax.scan))`` as learned_optimization runs it.

A port, for ``scripts/bench_meta_train.py --jax`` only, of exactly what the l2o side runs, for
two learned optimizers:

* ``mlp`` (:class:`JaxMLPUnroll`, ``l2o.learned.mlp_lopt``'s reference update): Adafactor-style
  features normalised per tensor, the tanh step embedding, the per-coordinate MLP, the
  ``-d exp(λ_exp a) λ_step`` output;
* ``ortho_mlp`` (:class:`JaxOrthoMLPUnroll`, ``l2o.learned.ortho_lopt``) in the configuration of
  the shipped default: momenta and second moment, the scale-free inputs, the per-coordinate
  MLP, Newton–Schulz orthogonalisation of the matrices' directions (float32), the ``adam_rms``
  step scale, decoupled weight decay, and AdamW on the vectors.

Both run on a ReLU MLP classifier with mean cross-entropy. Initial parameters and minibatches
come from the l2o task, so both sides train the same instances on the same data, and
:func:`check_same_losses` compares their inner losses before anything is timed. Needs the
optional ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from l2o.learned.base import LOpt
from l2o.learned.features import factored_dims
from l2o.learned.mlp_lopt import NORMALIZE_EPS, RSQRT_EPS, MLPLOpt
from l2o.learned.ortho_lopt import RELATIVE_EPS, TINY, OrthoMLPLOpt
from l2o.optim.muon import NS_COEFFICIENTS
from l2o.optim.rules import AdamW


def to_jax(tree: dict[str, torch.Tensor]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in tree.items()}


def _ema(average, value, decay):
    return value + decay * (average - value)  # torch.lerp(value, average, decay)


class JaxUnroll:
    """The inner training of ``task`` (an ``l2o`` MLP classifier task) under a learned
    optimizer; subclasses port one architecture's ``init_state`` and ``_update``.

    Args:
        layer_names: the task's parameter names in forward order (``0.weight``, ``0.bias``, ...).
        shapes: their shapes (torch layout: Linear weights are ``[out, in]``).
    """

    def __init__(self, layer_names: Sequence[str], shapes: Sequence[tuple[int, ...]]):
        self.names = list(layer_names)
        self.shapes = [tuple(s) for s in shapes]

    def init_state(self, params: dict) -> dict:
        raise NotImplementedError

    def _update(self, meta, grads, state, params, step):
        raise NotImplementedError

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

    # -- the unroll --------------------------------------------------------------------------

    def member_unroll(self, meta, params, xs, ys):
        """K inner steps of one instance from step 0: ``lax.scan`` over the first K of its
        K + 1 minibatches. Returns the K training losses (at the parameters each gradient was
        taken at) and the meta-loss terms, as l2o's ``MetaLossTerms.train``: the training loss
        after each update, on the next step's minibatch (the last one's on minibatch K)."""

        def inner_step(carry, batch):
            params, state, step = carry
            x, y = batch
            loss, grads = jax.value_and_grad(self.loss)(params, x, y)
            updates, state = self._update(meta, grads, state, params, step)
            params = {k: params[k] + updates[k] for k in params}
            return (params, state, step + 1.0), loss

        carry = (params, self.init_state(params), jnp.zeros((), jnp.float32))
        (params, _, _), losses = lax.scan(inner_step, carry, (xs[:-1], ys[:-1]))
        final = self.loss(params, xs[-1], ys[-1])
        return losses, jnp.concatenate([losses[1:], final[None]])

    def forward(self):
        """``jit(vmap(member_unroll))`` with per-member meta-parameters (the ES/PES path):
        ``[P, K]`` losses and each member's meta-loss (``train_mean``)."""

        def losses_and_meta_loss(meta, params, xs, ys):
            losses, terms = self.member_unroll(meta, params, xs, ys)
            return losses, jnp.mean(terms)

        return jax.jit(jax.vmap(losses_and_meta_loss))

    def tbptt(self):
        """Meta-gradient of the population's mean ``train_mean`` meta-loss w.r.t. shared
        meta-parameters (l2o's ``train_mean``: the mean of the meta-loss terms)."""

        def meta_loss(meta, params, xs, ys):
            unroll = jax.vmap(self.member_unroll, in_axes=(None, 0, 0, 0))
            _, terms = unroll(meta, params, xs, ys)
            return jnp.mean(terms)

        return jax.jit(jax.grad(meta_loss))


class JaxMLPUnroll(JaxUnroll):
    """The ``mlp`` learned optimizer (``lopt``: its config; meta-parameters are passed in)."""

    def __init__(
        self, lopt: MLPLOpt, layer_names: Sequence[str], shapes: Sequence[tuple[int, ...]]
    ):
        super().__init__(layer_names, shapes)
        self.lopt = lopt
        self.decays = {g: jnp.asarray(d, dtype=jnp.float32) for g, d in lopt.decays.items()}
        self.timescales = jnp.asarray(lopt.step_timescales, dtype=jnp.float32)

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

    def _tensor_update(self, meta, g, p, m, v, row, col, shape, step):
        g1, g2 = g[..., None], (g * g)[..., None]
        m = _ema(m, g1, self.decays["momentum"])
        v = _ema(v, g2, self.decays["rms"])
        dims = factored_dims(shape)
        if dims is None:
            row = _ema(row, g2, self.decays["adafactor"])
            v_hat = row_feat = col_feat = row
            rsqrt_row = rsqrt_col = lax.rsqrt(row + RSQRT_EPS)
        else:
            row_dim, col_dim = dims
            row = _ema(row, jnp.mean(g2, axis=col_dim), self.decays["adafactor"])
            col = _ema(col, jnp.mean(g2, axis=row_dim), self.decays["adafactor"])
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


class JaxOrthoMLPUnroll(JaxUnroll):
    """``ortho_mlp`` (``lopt``: its config; meta-parameters are passed in) in the options the
    shipped default uses; :func:`unroll_for` refuses the others."""

    def __init__(
        self, lopt: OrthoMLPLOpt, layer_names: Sequence[str], shapes: Sequence[tuple[int, ...]]
    ):
        super().__init__(layer_names, shapes)
        self.lopt = lopt
        self.beta_m = jnp.asarray(lopt.momentum_decays, dtype=jnp.float32)
        self.adamw = lopt.hand_rule()  # l2o.optim.rules.AdamW, checked by unroll_for

    def _is_matrix(self, shape) -> bool:
        return len(shape) >= 2

    def init_state(self, params: dict) -> dict:
        k = len(self.lopt.momentum_decays)
        state = {"m": {}, "v": {}, "exp_avg": {}, "exp_avg_sq": {}}
        for name, shape in zip(self.names, self.shapes, strict=True):
            if self._is_matrix(shape):
                state["m"][name] = jnp.zeros((*shape, k))
                state["v"][name] = jnp.zeros(shape)
            else:
                state["exp_avg"][name] = jnp.zeros(shape)
                state["exp_avg_sq"][name] = jnp.zeros(shape)
        return state

    def _newton_schulz(self, x):
        a, b, c = NS_COEFFICIENTS
        tall = x.shape[0] > x.shape[1]
        if tall:
            x = x.T
        x = x / jnp.maximum(jnp.linalg.norm(x), 1e-7)
        for _ in range(self.lopt.ns_steps):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.T if tall else x

    def _matrix_update(self, meta, g, p, m, v, step):
        lopt = self.lopt
        m = _ema(m, g[..., None], self.beta_m)
        v = _ema(v, g * g, lopt.rms_decay)
        floor = RELATIVE_EPS * jnp.mean(v) + TINY
        inv_s = lax.rsqrt(v + floor)
        v_hat = jnp.outer(v.mean(1), v.mean(0)) / (jnp.mean(v) + TINY)
        inputs = [m[..., j] * inv_s for j in range(m.shape[-1])] + [g * inv_s]
        inputs.append(m[..., 0] * lax.rsqrt(v_hat + floor))
        h = jnp.stack(inputs, axis=-1).reshape(-1, len(inputs))
        layers = len(lopt.hidden_sizes) + 1
        for i in range(layers):
            h = h @ meta[f"w{i}"] + meta[f"b{i}"]
            if i < layers - 1:
                h = jax.nn.relu(h)
        base = inputs[lopt.base_momentum].reshape(-1)
        u = ((base + h[:, 0]) * jnp.exp(lopt.exp_mult * h[:, 1])).reshape(g.shape)
        u = jnp.where(v > 0, u, 0.0)
        measured = inputs[lopt.step_scale_momentum]
        count = step + 1.0
        beta = self.beta_m[lopt.step_scale_momentum]
        correction = jnp.sqrt(1 - lopt.rms_decay**count) / (1 - beta**count)
        rms = jnp.sqrt(jnp.mean(measured * measured) + TINY)
        step_size = jnp.exp(meta["log_lr_matrix"]) * jnp.minimum(rms * correction, 1.0)
        rows, cols = g.shape
        direction = math.sqrt(max(1.0, rows / cols)) * self._newton_schulz(u)
        return -step_size * (direction + lopt.weight_decay * p), m, v

    def _vector_update(self, g, p, exp_avg, exp_avg_sq, step):
        """``l2o.optim.rules.AdamW`` (decoupled weight decay) with ``vector_hparams``."""
        lr, wd, eps = self.adamw.lr, self.adamw.weight_decay, self.adamw.eps
        beta1, beta2 = self.adamw.betas
        exp_avg = exp_avg + (1 - beta1) * (g - exp_avg)
        exp_avg_sq = exp_avg_sq + (1 - beta2) * (g * g - exp_avg_sq)
        count = step + 1.0
        v_hat = exp_avg_sq / (1 - beta2**count)
        update = -lr / (1 - beta1**count) * exp_avg / (jnp.sqrt(v_hat) + eps)
        return update - lr * wd * p, exp_avg, exp_avg_sq

    def _update(self, meta, grads, state, params, step):
        new = {slot: {} for slot in state}
        updates = {}
        for name, shape in zip(self.names, self.shapes, strict=True):
            g, p = grads[name], params[name]
            if self._is_matrix(shape):
                updates[name], new["m"][name], new["v"][name] = self._matrix_update(
                    meta, g, p, state["m"][name], state["v"][name], step
                )
            else:
                updates[name], new["exp_avg"][name], new["exp_avg_sq"][name] = self._vector_update(
                    g, p, state["exp_avg"][name], state["exp_avg_sq"][name], step
                )
        return updates, new


def unroll_for(
    lopt: LOpt, layer_names: Sequence[str], shapes: Sequence[tuple[int, ...]]
) -> JaxUnroll:
    """The port of ``lopt``'s architecture, refusing options the port does not implement."""
    if isinstance(lopt, MLPLOpt):
        return JaxMLPUnroll(lopt, layer_names, shapes)
    if isinstance(lopt, OrthoMLPLOpt):
        supported = {
            "parameter_feature": False,
            "step_timescales": (),
            "mask_unseen": True,
            "step_scale": "adam_rms",
            "matrix_scaling": "spectral",
            "ns_dtype": "float32",
            "vector_rule": "adamw",
            "vector_keys": (),
        }
        for option, value in supported.items():
            got = getattr(lopt, option)
            if (tuple(got) if isinstance(got, list | tuple) else got) != value:
                raise ValueError(f"the JAX port of ortho_mlp needs {option}={value!r}, got {got!r}")
        adamw = lopt.hand_rule()
        plain = {"amsgrad": False, "eps_root": 0.0, "decoupled_weight_decay": True}
        if type(adamw) is not AdamW or not isinstance(adamw.lr, float | int):
            raise ValueError(f"the JAX port of ortho_mlp needs AdamW at a constant lr, got {adamw}")
        for option, value in plain.items():
            if getattr(adamw, option) != value:
                raise ValueError(f"the JAX port of ortho_mlp's AdamW needs {option}={value!r}")
        return JaxOrthoMLPUnroll(lopt, layer_names, shapes)
    raise ValueError(f"no JAX port of the {lopt.name} learned optimizer (mlp, ortho_mlp)")


def population_inputs(task, seeds: Sequence[int], steps: int):
    """The l2o task's initial parameters ``{name: [P, ...]}`` and minibatches
    ``xs [P, K + 1, B, D]``, ``ys [P, K + 1, B]`` for ``seeds`` (the last one scores the last
    update), as JAX arrays."""
    params = to_jax(task.population_init(list(seeds)))
    batches = [[task.batch(s, k) for k in range(steps + 1)] for s in seeds]
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


def check_same_meta_gradients(
    jax_grads: dict[str, jax.Array], l2o_grads: dict[str, torch.Tensor | None], rtol: float = 1e-2
) -> float:
    """Raise unless the TBPTT meta-gradients agree (a meta-parameter l2o's autograd does not
    reach, None, must get a zero gradient in JAX); return the largest relative difference,
    each meta-parameter's measured against its own largest entry. The tolerance is loose for
    the reason :func:`check_same_losses` gives: 20 steps amplify rounding (about 1e-3 seen)."""
    worst = 0.0
    for name, expected in l2o_grads.items():
        got = np.asarray(jax_grads[name])
        if expected is None:
            np.testing.assert_array_equal(got, 0.0, err_msg=name)
            continue
        expected = expected.detach().cpu().numpy()
        scale = max(float(np.max(np.abs(expected))), 1e-12)
        difference = float(np.max(np.abs(got - expected))) / scale
        if difference > rtol:
            raise AssertionError(f"{name}: JAX and l2o meta-gradients differ by {difference:.1e}")
        worst = max(worst, difference)
    return worst


__all__ = [
    "JaxMLPUnroll",
    "JaxOrthoMLPUnroll",
    "JaxUnroll",
    "check_same_losses",
    "check_same_meta_gradients",
    "population_inputs",
    "to_jax",
    "unroll_for",
]
