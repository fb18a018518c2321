"""``l2o.LearnedOptimizer``: a meta-trained learned optimizer as a drop-in ``torch.optim`` class.

    opt = l2o.LearnedOptimizer(model.parameters())            # the shipped "default" checkpoint
    opt = l2o.LearnedOptimizer(model.parameters(), checkpoint="runs/x/checkpoints/last", lr=0.5)

It is the generic :class:`~l2o.optim.adapter.RuleOptimizer` running ``lopt.rule(meta_params)``;
``lr`` (default 1.0) multiplies the learned step, so LR schedulers scale it. The checkpoint's
identity (``"<lopt>-<sha256 prefix>"``) is saved in ``state_dict`` and checked on load, so
optimizer state is never silently resumed under a different learned optimizer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from l2o.learned.checkpoint import checkpoint_id, load_checkpoint, resolve_checkpoint
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import Params, UpdateRule

#: Key of the extra entry these classes add to ``state_dict``.
IDENTITY_KEY = "l2o"


class CheckpointedRules:
    """A learned optimizer loaded from a checkpoint, with its rule built once per device."""

    def __init__(self, checkpoint: str | os.PathLike) -> None:
        self.path = resolve_checkpoint(checkpoint)
        self.lopt, self.meta_params, self.card = load_checkpoint(self.path)
        self.id = checkpoint_id(self.card)
        self._rules: dict[torch.device, UpdateRule] = {}

    def rule(self, device: torch.device) -> UpdateRule:
        if device not in self._rules:
            meta: Params = {k: v.to(device) for k, v in self.meta_params.items()}
            self._rules[device] = self.lopt.rule(meta)
        return self._rules[device]


class CheckpointedOptimizer(RuleOptimizer):
    """RuleOptimizer whose rule holds a learned optimizer: rebuilt for the device of each param
    group by ``rule_for_device``, with ``identity`` stored in and checked against ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rule_for_device: Callable[[torch.device], UpdateRule],
        identity: dict[str, Any],
        **overrides: Any,
    ) -> None:
        self._rule_for_device = rule_for_device
        self.identity = identity
        super().__init__(params, rule_for_device(torch.device("cpu")), **overrides)

    def _base_rule(self, group: Mapping[str, Any]) -> UpdateRule:
        return self._rule_for_device(group["params"][0].device)

    def state_dict(self) -> dict[str, Any]:
        saved = super().state_dict()
        saved[IDENTITY_KEY] = dict(self.identity)
        return saved

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        found = state_dict.get(IDENTITY_KEY)
        if found != self.identity:
            raise ValueError(
                f"this optimizer state was saved by {found or 'a different optimizer'}, not by "
                f"{self.identity}: load it into an optimizer built with the same checkpoint (and "
                "fallback), or start the optimizer afresh"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != IDENTITY_KEY})


class LearnedOptimizer(CheckpointedOptimizer):
    """A meta-trained learned optimizer as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or param-group dicts.
        checkpoint: a shipped checkpoint name (``"default"``) or a checkpoint path.
        lr: multiplier on the learned step (what LR schedulers scale).
    """

    def __init__(
        self, params: Iterable[Any], checkpoint: str | os.PathLike = "default", lr: float = 1.0
    ) -> None:
        self.learned = CheckpointedRules(checkpoint)
        super().__init__(params, self.learned.rule, {"checkpoint": self.learned.id}, lr=lr)
