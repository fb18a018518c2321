"""Coordinatewise LSTM learned optimizer (Andrychowicz et al., NeurIPS 2016).

One small LSTM (2 layers × 20 units by default) is shared by all coordinates; each coordinate
carries its own hidden and cell states. Its input is the preprocessed gradient

    (log|g| / p, sign g)   if |g| >= e^-p,     (-1, e^p g)   otherwise,      p = 10,

which keeps gradients of very different scales in a range the LSTM can use. A linear layer
maps the top hidden state to the update, ``Δ = -lr · output_scale · (W h + b)`` with
``output_scale = 0.1``; ``lr`` (default 1) is the rule's field, scaled by the adapter and
schedulers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor

from l2o.learned.base import LOpt
from l2o.learned.features import log_sign_preprocess
from l2o.learned.rule import LearnedRule
from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    check_hyperparameter,
    lr_at,
)

_INPUT_SIZE = 2  # (log-magnitude, sign) features of the gradient


class LSTMLOpt(LOpt):
    """Coordinatewise LSTM learned optimizer (registry name ``"lstm"``).

    Args:
        hidden_size: units per LSTM layer.
        num_layers: stacked LSTM layers.
        preprocess_p: ``p`` of the log/sign gradient preprocessing.
        output_scale: multiplies the linear output (0.1 in the paper).
        output_init_std: std of the output layer's initial weights (small first steps).
    """

    name = "lstm"

    def __init__(
        self,
        hidden_size: int = 20,
        num_layers: int = 2,
        preprocess_p: float = 10.0,
        output_scale: float = 0.1,
        output_init_std: float = 0.01,
    ) -> None:
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(
                f"hidden_size and num_layers must be >= 1, got {hidden_size}, {num_layers}"
            )
        check_hyperparameter("preprocess_p", preprocess_p, low=0.0, low_inclusive=False)
        check_hyperparameter("output_scale", output_scale)
        check_hyperparameter("output_init_std", output_init_std)
        self.preprocess_p = float(preprocess_p)
        self.output_scale = float(output_scale)
        self.output_init_std = float(output_init_std)

    def config(self) -> dict:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
            "output_init_std": self.output_init_std,
        }

    def init_meta(self, generator: torch.Generator) -> Params:
        """Per layer ``l``: ``lstm{l}.w_ih`` ``[in, 4H]``, ``lstm{l}.w_hh`` ``[H, 4H]``,
        ``lstm{l}.b`` ``[4H]`` (gates i, f, g, o; uniform ±1/sqrt(H) like ``torch.nn.LSTM``,
        forget bias +1); ``out.w`` ``[H, 1]`` (normal, std ``output_init_std``) and ``out.b``
        ``[1]`` (zero)."""
        h, dev = self.hidden_size, generator.device
        bound = 1.0 / math.sqrt(h)

        def uniform(*shape: int) -> Tensor:
            return (torch.rand(*shape, generator=generator, device=dev) * 2 - 1) * bound

        meta: Params = {}
        for layer in range(self.num_layers):
            fan_in = _INPUT_SIZE if layer == 0 else h
            meta[f"lstm{layer}.w_ih"] = uniform(fan_in, 4 * h)
            meta[f"lstm{layer}.w_hh"] = uniform(h, 4 * h)
            bias = uniform(4 * h)
            # A forget-gate bias of 1 keeps the cell's memory at the start of meta-training.
            meta[f"lstm{layer}.b"] = torch.cat([bias[:h], bias[h : 2 * h] + 1.0, bias[2 * h :]])
        meta["out.w"] = torch.randn(h, 1, generator=generator, device=dev) * self.output_init_std
        meta["out.b"] = torch.zeros(1, device=dev)
        return meta

    def rule(self, meta_params: Params, lr: LearningRate = 1.0) -> LSTMRule:
        return LSTMRule(lopt=self, meta_params=meta_params, lr=lr)

    def __repr__(self) -> str:
        return f"LSTMLOpt({self.config()})"


@dataclasses.dataclass(frozen=True)
class LSTMRule(LearnedRule):
    """The update rule of :class:`LSTMLOpt` at fixed ``meta_params`` (held by reference).

    State: per-parameter slots ``h`` and ``c`` of shape ``[*param.shape, num_layers, hidden]``.
    """

    PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset({"h", "c"})

    lopt: LSTMLOpt = dataclasses.field(repr=False)

    def init(self, params: Params) -> State:
        state: State = {"h": {}, "c": {}}
        for name, p in params.items():
            shape = (*p.shape, self.lopt.num_layers, self.lopt.hidden_size)
            dtype = torch.promote_types(p.dtype, torch.float32)
            for slot in state:
                state[slot][name] = torch.zeros(shape, dtype=dtype, device=p.device)
        return state

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        new_state: State = {"h": {}, "c": {}}
        updates: Params = {}
        scale = lr_at(self.lr, step) * self.lopt.output_scale
        for name, p in params.items():
            h_prev, c_prev = state["h"][name], state["c"][name]
            shape, dtype = p.shape, h_prev.dtype
            n = p.numel()
            h_prev = h_prev.reshape(n, *h_prev.shape[-2:])
            c_prev = c_prev.reshape(n, *c_prev.shape[-2:])
            meta = {k: v.to(p.device, dtype) for k, v in self.meta_params.items()}
            x = log_sign_preprocess(grads[name].to(dtype).reshape(n), self.lopt.preprocess_p)
            hs, cs = [], []
            for layer in range(self.lopt.num_layers):
                gates = torch.addmm(
                    torch.addmm(meta[f"lstm{layer}.b"], x, meta[f"lstm{layer}.w_ih"]),
                    h_prev[:, layer],
                    meta[f"lstm{layer}.w_hh"],
                )
                i, f, z, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c_prev[:, layer] + torch.sigmoid(i) * torch.tanh(z)
                x = torch.sigmoid(o) * torch.tanh(c)
                hs.append(x)
                cs.append(c)
            out = torch.addmm(meta["out.b"], x, meta["out.w"])
            updates[name] = (-scale * out).reshape(shape).to(p.dtype)
            new_state["h"][name] = torch.stack(hs, dim=1).reshape(state["h"][name].shape)
            new_state["c"][name] = torch.stack(cs, dim=1).reshape(state["c"][name].shape)
        return updates, new_state
