"""Per-parameter MLP learned optimizer with Adafactor-style features (Metz et al. 2022).

In the spirit of learned_optimization's ``adafac_mlp_lopt`` / ``small_fc_lopt``: every coordinate
of every tensor is fed to one small MLP shared across all coordinates. Its inputs are

    g, p,                                   gradient and parameter value
    m_k = EMA_{β_k}(g)                      momenta, β = (0.1, 0.5, 0.9, 0.99, 0.999)
    v_r = EMA_{β_r}(g²)                     second moments, β = (0.999,)
    m_k · rsqrt(v),  rsqrt(v_r)             Adam-like ratios (v: the slowest v_r)
    row_f, col_f, rsqrt(row_f), rsqrt(col_f)   Adafactor row/column EMAs of g², β = (.9,.99,.999)
    g · rsqrt(v̂_f),  m_k · rsqrt(v̂)         v̂_f = row_f ⊗ col_f / mean(row_f), Adafactor's
                                            rank-1 estimate of E[g²] (v̂: the slowest v̂_f); for
                                            1-D/0-D tensors row_f = col_f = v̂_f = full EMA

each normalised per tensor to unit second moment (``x / sqrt(mean(x²) + eps)``), plus the step
embedding ``tanh(t / τ - 1)`` for τ in 1 … 1e5, the same for every coordinate. The MLP (ReLU
hidden layers, 32 × 32 by default) outputs a direction ``d`` and a log-magnitude ``a``:

    Δ = -lr · d · exp(λ_exp · a) · λ_step,    λ_exp = λ_step = 1e-3.

``lr`` (default 1) is the rule's field, so the ``torch.optim`` adapter and LR schedulers scale it.
The output layer starts small, so a freshly initialised optimizer takes small steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from l2o.learned.base import LOpt, check_decays, check_timescales, init_mlp
from l2o.learned.features import (
    STEP_TIMESCALES,
    decays_from_logits,
    ema,
    factored_dims,
    factored_second_moment,
    logit,
    tanh_step_embedding,
)
from l2o.learned.mlp_fused import TensorStep
from l2o.learned.rule import BlockedLearnedRule
from l2o.optim.base import (
    LearningRate,
    Params,
    State,
    Step,
    check_hyperparameter,
    lr_at,
)

#: Inside every rsqrt of a second moment: finite features and derivatives for zero gradients.
RSQRT_EPS = 1e-8
#: Inside the per-tensor feature normaliser (as in Metz et al.).
NORMALIZE_EPS = 1e-5

_DECAY_GROUPS = ("momentum", "rms", "adafactor")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulators live in at least float32: a decay such as 0.999 rounds to 1.0 in bfloat16.
    return torch.promote_types(dtype, torch.float32)


class MLPLOpt(LOpt):
    """Per-parameter MLP learned optimizer (registry name ``"mlp"``).

    Args:
        hidden_sizes: widths of the ReLU hidden layers.
        momentum_decays, rms_decays, adafactor_decays: EMA decays of the accumulators.
        learn_decays: if true, the decays are meta-parameters (``sigmoid`` of logits initialised
            at the values above); otherwise they are constants.
        step_timescales: τ of the ``tanh(step / τ - 1)`` step embedding.
        exp_mult, step_mult: λ_exp and λ_step of the output parametrisation.
        output_init_scale: multiplies the output layer's initial weights (small first steps).
    """

    name = "mlp"

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (32, 32),
        momentum_decays: Sequence[float] = (0.1, 0.5, 0.9, 0.99, 0.999),
        rms_decays: Sequence[float] = (0.999,),
        adafactor_decays: Sequence[float] = (0.9, 0.99, 0.999),
        learn_decays: bool = False,
        step_timescales: Sequence[float] = STEP_TIMESCALES,
        exp_mult: float = 1e-3,
        step_mult: float = 1e-3,
        output_init_scale: float = 0.1,
    ) -> None:
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {list(hidden_sizes)}")
        self.decays = {
            "momentum": check_decays("momentum_decays", momentum_decays),
            "rms": check_decays("rms_decays", rms_decays),
            "adafactor": check_decays("adafactor_decays", adafactor_decays),
        }
        self.learn_decays = bool(learn_decays)
        self.step_timescales = check_timescales(step_timescales)
        for name, value in [
            ("exp_mult", exp_mult),
            ("step_mult", step_mult),
            ("output_init_scale", output_init_scale),
        ]:
            check_hyperparameter(name, value)
        self.exp_mult = float(exp_mult)
        self.step_mult = float(step_mult)
        self.output_init_scale = float(output_init_scale)

    @property
    def num_features(self) -> int:
        """Normalised per-coordinate features (the step embedding comes on top)."""
        k, r, f = (len(self.decays[g]) for g in _DECAY_GROUPS)
        return 2 + 3 * k + 2 * r + 5 * f

    def config(self) -> dict:
        return {
            "hidden_sizes": list(self.hidden_sizes),
            "momentum_decays": list(self.decays["momentum"]),
            "rms_decays": list(self.decays["rms"]),
            "adafactor_decays": list(self.decays["adafactor"]),
            "learn_decays": self.learn_decays,
            "step_timescales": list(self.step_timescales),
            "exp_mult": self.exp_mult,
            "step_mult": self.step_mult,
            "output_init_scale": self.output_init_scale,
        }

    def init_meta(self, generator: torch.Generator) -> Params:
        """MLP weights ``w{i}`` (``[fan_in, fan_out]``, clipped normal, std ``1/sqrt(fan_in)``),
        zero biases ``b{i}``, and ``{group}_decay_logits`` when ``learn_decays``."""
        sizes = [self.num_features + len(self.step_timescales), *self.hidden_sizes, 2]
        meta = init_mlp(sizes, generator, self.output_init_scale)
        if self.learn_decays:
            for group in _DECAY_GROUPS:
                logits = [logit(d) for d in self.decays[group]]
                meta[f"{group}_decay_logits"] = torch.tensor(logits, device=generator.device)
        return meta

    def rule(self, meta_params: Params, lr: LearningRate = 1.0) -> MLPRule:
        return MLPRule(lopt=self, meta_params=meta_params, lr=lr)

    def __repr__(self) -> str:
        return f"MLPLOpt({self.config()})"


@dataclasses.dataclass(frozen=True)
class MLPRule(BlockedLearnedRule):
    """The update rule of :class:`MLPLOpt` at fixed ``meta_params`` (held by reference, so
    meta-gradients flow through :meth:`update`)."""

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"m", "v", "fac_row", "fac_col"})
    #: One MLP evaluation per tensor on that tensor's own features (normalised per tensor).
    TENSORWISE: ClassVar[bool] = True

    lopt: MLPLOpt = dataclasses.field(repr=False)

    def init(self, params: Params) -> State:
        state: State = {"m": {}, "v": {}, "fac_row": {}, "fac_col": {}}
        k, r, f = (len(self.lopt.decays[g]) for g in _DECAY_GROUPS)
        for name, p in params.items():
            kw = {"dtype": _compute_dtype(p.dtype), "device": p.device}
            shape = tuple(p.shape)
            state["m"][name] = torch.zeros(*shape, k, **kw)
            state["v"][name] = torch.zeros(*shape, r, **kw)
            dims = factored_dims(shape)
            if dims is None:  # the full second moment; no column statistics
                state["fac_row"][name] = torch.zeros(*shape, f, **kw)
                state["fac_col"][name] = torch.zeros(0, **kw)
            else:
                row_dim, col_dim = dims
                row_shape = shape[:col_dim] + shape[col_dim + 1 :]
                col_shape = shape[:row_dim] + shape[row_dim + 1 :]
                state["fac_row"][name] = torch.zeros(*row_shape, f, **kw)
                state["fac_col"][name] = torch.zeros(*col_shape, f, **kw)
        return state

    def _decays(self, group: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.lopt.learn_decays:
            return decays_from_logits(self.meta_params[f"{group}_decay_logits"]).to(device, dtype)
        return torch.tensor(self.lopt.decays[group], dtype=dtype, device=device)

    def _accumulate(
        self, g: Tensor, state: State, name: str, decays: tuple[Tensor, ...]
    ) -> dict[str, Tensor]:
        """The new accumulators ``m, v, fac_row, fac_col`` of one tensor (``g`` in their dtype).

        ``decays``: the (momentum, rms, adafactor) decay vectors in the state's dtype."""
        beta_m, beta_v, beta_f = decays
        g1, g2 = g.unsqueeze(-1), (g * g).unsqueeze(-1)
        m = ema(state["m"][name], g1, beta_m)
        v = ema(state["v"][name], g2, beta_v)
        dims = factored_dims(tuple(g.shape))
        if dims is None:
            row = ema(state["fac_row"][name], g2, beta_f)
            col = state["fac_col"][name]
        else:
            row_dim, col_dim = dims
            row = ema(state["fac_row"][name], g2.mean(dim=col_dim), beta_f)
            col = ema(state["fac_col"][name], g2.mean(dim=row_dim), beta_f)
        return {"m": m, "v": v, "fac_row": row, "fac_col": col}

    def _features(self, g: Tensor, p: Tensor, slots: dict[str, Tensor]) -> Tensor:
        """Raw (unnormalised) features ``[numel, num_features]`` of one tensor from its new
        accumulators ``slots`` (``g``, ``p`` in their dtype)."""
        g1 = g.unsqueeze(-1)
        m, v, row, col = slots["m"], slots["v"], slots["fac_row"], slots["fac_col"]
        dims = factored_dims(tuple(g.shape))
        if dims is None:
            v_hat = row
            row_feat = col_feat = row
            rsqrt_row = rsqrt_col = torch.rsqrt(row + RSQRT_EPS)
        else:
            row_dim, col_dim = dims
            v_hat = factored_second_moment(row, col, dims, RSQRT_EPS)
            # Row/column statistics are computed at their own (small) size, then broadcast.
            full = v_hat.shape
            row_feat = row.unsqueeze(col_dim).expand(full)
            col_feat = col.unsqueeze(row_dim).expand(full)
            rsqrt_row = torch.rsqrt(row + RSQRT_EPS).unsqueeze(col_dim).expand(full)
            rsqrt_col = torch.rsqrt(col + RSQRT_EPS).unsqueeze(row_dim).expand(full)
        rsqrt_v = torch.rsqrt(v + RSQRT_EPS)
        rsqrt_v_hat = torch.rsqrt(v_hat + RSQRT_EPS)
        feats = torch.cat(
            [
                g1,
                p.unsqueeze(-1),
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
            dim=-1,
        )
        return feats.reshape(-1, feats.shape[-1])

    def _meta(self, like: Tensor) -> Params:
        return {k: v.to(like.device, like.dtype) for k, v in self.meta_params.items()}

    def _first_layer(
        self, meta: Params, mean_squares: Tensor, step_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """First-layer weights with the per-tensor feature normaliser folded in, and its bias.

        Running the MLP on ``[second_moment_normalize(x), step_embedding]`` per coordinate
        equals ``x @ w + bias`` with these: the normalisation is a diagonal scale of the first
        layer's rows, and the step embedding (the same for every coordinate) goes through the
        first layer once, as part of the bias."""
        c = mean_squares.shape[-1]
        w0 = meta["w0"]
        scale = torch.rsqrt(mean_squares + NORMALIZE_EPS)
        return scale.unsqueeze(-1) * w0[:c], step_embedding @ w0[c:] + meta["b0"]

    def _rest_of_mlp(self, meta: Params, first_layer_output: Tensor) -> Tensor:
        """The hidden layers and output layer after the first layer: ``[n, H] -> [n, 2]``."""
        h = first_layer_output
        for i in range(1, len(self.lopt.hidden_sizes) + 1):
            # In place: h is a fresh product that autograd does not keep (addmm saves inputs).
            h = torch.addmm(meta[f"b{i}"], torch.relu_(h), meta[f"w{i}"])
        return h

    def _step_from_outputs(self, outputs: Tensor, scale: float | Tensor) -> Tensor:
        """``Δ = -d · exp(λ_exp · a) · scale`` from the MLP's ``[n, 2]`` outputs ``(d, a)``."""
        direction, log_magnitude = outputs.unbind(-1)
        return -direction * torch.exp(log_magnitude * self.lopt.exp_mult) * scale

    def _tensor_update_reference(
        self, g: Tensor, p: Tensor, slots: dict[str, Tensor], embedding: Tensor, scale
    ) -> Tensor:
        """One tensor's update with its whole ``[numel, 34]`` feature matrix materialised."""
        x = self._features(g, p, slots)
        meta = self._meta(x)
        w, bias = self._first_layer(meta, torch.mean(x * x, dim=0), embedding)
        return self._step_from_outputs(self._rest_of_mlp(meta, torch.addmm(bias, x, w)), scale)

    def _tensor_update_fused(
        self, g: Tensor, p: Tensor, slots: dict[str, Tensor], embedding: Tensor, scale
    ) -> Tensor:
        """One tensor's update computed block by block (:mod:`l2o.learned.mlp_fused`)."""
        widths = {group: len(self.lopt.decays[group]) for group in _DECAY_GROUPS}
        tensor = TensorStep(
            g,
            p,
            slots["m"],
            slots["v"],
            slots["fac_row"],
            slots["fac_col"],
            rsqrt_eps=RSQRT_EPS,
            widths=widths,
            chunk_size=self.chunk_size,
        )
        meta = self._meta(g)
        mean_squares, only_block = tensor.mean_squares()
        w, bias = self._first_layer(meta, mean_squares, embedding)
        w_coord, shared_plus_bias = tensor.first_layer_shares(w, bias)
        blocks = []
        for block in tensor.blocks:
            x = only_block if only_block is not None else tensor.coordinate_features(block)
            h = torch.addmm(shared_plus_bias(block), x.T, w_coord)
            blocks.append(self._step_from_outputs(self._rest_of_mlp(meta, h), scale))
        return torch.cat(blocks)

    def _update(
        self, grads: Params, state: State, params: Params, step: Step, fused_above: int | None
    ) -> tuple[Params, State]:
        new_state: State = {slot: {} for slot in state}
        updates: Params = {}
        scale = lr_at(self.lr, step) * self.lopt.step_mult
        # Decays and step embedding are built once per dtype, not once per tensor (each build
        # is a host-to-device copy on GPU).
        decays: dict[torch.dtype, tuple[Tensor, ...]] = {}
        embeddings: dict[torch.dtype, Tensor] = {}
        # One MLP evaluation per tensor: the features are normalised per tensor anyway.
        for name, p in params.items():
            dtype = state["m"][name].dtype
            if dtype not in decays:
                decays[dtype] = tuple(self._decays(g, dtype, p.device) for g in _DECAY_GROUPS)
                embeddings[dtype] = tanh_step_embedding(
                    step, self.lopt.step_timescales, dtype=dtype, device=p.device
                )
            g, p_c = grads[name].to(dtype), p.to(dtype)
            slots = self._accumulate(g, state, name, decays[dtype])
            if fused_above is not None and p.numel() > fused_above:
                delta = self._tensor_update_fused(g, p_c, slots, embeddings[dtype], scale)
            else:
                delta = self._tensor_update_reference(g, p_c, slots, embeddings[dtype], scale)
            updates[name] = delta.reshape(p.shape).to(p.dtype)
            for slot, value in slots.items():
                new_state[slot][name] = value
        return updates, new_state
