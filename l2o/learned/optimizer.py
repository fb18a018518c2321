"""``l2o.LearnedOptimizer``: a meta-trained learned optimizer as a drop-in ``torch.optim`` class.

    opt = l2o.LearnedOptimizer(model.parameters())            # the shipped "default" checkpoint
    opt = l2o.LearnedOptimizer(model.named_parameters())      # the same, tensors known by name
    opt = l2o.LearnedOptimizer(model.parameters(), checkpoint="runs/x/checkpoints/last", lr=0.5)

It is the generic :class:`~l2o.optim.adapter.RuleOptimizer` running ``lopt.rule(meta_params)``;
``lr`` (default 1.0) multiplies the learned step, so LR schedulers scale it. The checkpoint's
identity (``"<lopt>-<sha256 prefix>"``) is saved in ``state_dict`` and checked on load, so
optimizer state is never silently resumed under a different learned optimizer.

A checkpoint meta-trained with its updates annealed over each episode
(``estimator.update_schedule``, e.g. cosine) needs the length of the user's run as well::

    opt = l2o.LearnedOptimizer(model.parameters(), checkpoint="...", total_steps=10_000)

and then anneals the same way over those steps (step ``total_steps`` and later ones are 0).
For ``wsd`` (constant steps, then a linear cool-down over the last 20% of the run)
``total_steps`` may be left out when the run's length is not known: the optimizer then takes the
constant steps throughout, as in the first 80% of a meta-training episode, and warns.

``update_schedule=`` anneals otherwise than the checkpoint's card says, e.g. the wsd cool-down
on a checkpoint meta-trained with constant steps (it helps the shipped one; EVALUATION.md)::

    opt = l2o.LearnedOptimizer(model.parameters(), update_schedule="wsd", total_steps=10_000)

``ns_dtype=`` runs an orthogonalising checkpoint's Newton–Schulz iteration in another dtype than
its card's (``"bfloat16"``, as Muon does; ``"float32"``, ``"float64"``). It is a numerical
setting of the same optimizer, not a new one: the meta-parameters and the identity saved in
``state_dict`` are the checkpoint's. At 1M parameters bfloat16 made the step 1.8–2.1x faster
on CPUs with bfloat16 matrix units (AVX-512-BF16, AMX); on GPUs, where it is Muon's default,
and on CPUs without such units it is not measured (BENCHMARKS.md)::

    opt = l2o.LearnedOptimizer(model.parameters(), ns_dtype="bfloat16")

``compile=True`` computes each tensor's accumulators and per-coordinate direction in one
``torch.compile``d pass (inductor: C++ on CPU, which needs a compiler, Triton on GPU) instead of
the eager blocked path: the same update to float32 rounding, for checkpoints whose architecture
has that path (``ortho_mlp``). The first steps compile, about 10 s per kind of tensor (matrix or
vector, and a few size patterns) on a 2-core CPU; where compilation fails, a warning says why and
the steps run eagerly. Measured speed-ups are in BENCHMARKS.md::

    opt = l2o.LearnedOptimizer(model.parameters(), ns_dtype="bfloat16", compile=True)
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from l2o.learned.base import LOpt
from l2o.learned.checkpoint import (
    checkpoint_id,
    load_checkpoint,
    resolve_checkpoint,
    shipped_names_of,
    update_schedule_of,
)
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import Params, UpdateRule
from l2o.optim.schedules import check_update_schedule, run_annealing
from l2o.validation import positive_int

#: Key of the extra entry these classes add to ``state_dict``.
IDENTITY_KEY = "l2o"
#: Update schedules that leave the steps unchanged until their decay, so that a checkpoint
#: meta-trained with one also runs without ``total_steps`` (its stable phase alone).
HORIZON_FREE_UNTIL_DECAY = ("wsd",)


class CheckpointedRules:
    """A learned optimizer loaded from a checkpoint, with its rule built once per device.

    ``total_steps``: the length of the run, required when the checkpoint was meta-trained with
    an update schedule (``update_schedule``, from its card) and unused otherwise; optional for
    ``wsd``, whose steps are the constant ones until the decay (without it: no decay, and a
    warning). ``update_schedule``: anneal so instead of as the card says (None: as the card).
    ``ns_dtype``: the dtype of the Newton–Schulz iteration, for a checkpoint that has one (None:
    as the card). ``compile``: the rule's compiled per-coordinate path (refused, naming the
    checkpoint, for an architecture without one)."""

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        total_steps: int | None = None,
        update_schedule: str | None = None,
        ns_dtype: str | None = None,
        compile: bool = False,
    ) -> None:
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got {compile!r}")
        self.path = resolve_checkpoint(checkpoint)
        self.lopt, self.meta_params, self.card = load_checkpoint(self.path)
        self.id = checkpoint_id(self.card)
        if ns_dtype is not None:
            self.lopt = with_ns_dtype(self.lopt, ns_dtype, self.id)
        self.update_schedule = check_update_schedule(
            update_schedule_of(self.card) if update_schedule is None else update_schedule
        )
        if self.update_schedule == "constant":
            self.total_steps = None
        elif total_steps is None and self.update_schedule in HORIZON_FREE_UNTIL_DECAY:
            # Until its decay a wsd run is the constant-step optimizer, so a run of unknown
            # length can take that phase alone; it loses the cool-down, hence the warning.
            warnings.warn(
                f"checkpoint {self.id} anneals its steps over the last part of each run "
                f"({self.update_schedule}); without total_steps= it runs without that "
                "cool-down (pass the number of optimizer steps your run will take)",
                stacklevel=3,
            )
            self.total_steps = None
        elif total_steps is None:
            raise ValueError(
                f"checkpoint {self.id} was meta-trained with its steps annealed over each run "
                f"({self.update_schedule} to 0): pass total_steps=, the number of optimizer "
                "steps your run will take"
            )
        else:
            self.total_steps = positive_int("total_steps", total_steps)
        self.compile = compile
        if compile and "compiled" not in {f.name for f in dataclasses.fields(self._rule_type())}:
            raise ValueError(
                f"compile=True: checkpoint {self.id} ({self.lopt.name}) has no compiled step; "
                "leave compile out"
            )
        self._rules: dict[torch.device, UpdateRule] = {}

    def annealed(self, rule: UpdateRule) -> UpdateRule:
        """``rule`` with its (float) ``lr`` annealed over ``total_steps``, as in meta-training;
        ``rule`` itself for a checkpoint without an update schedule."""
        if self.total_steps is None:
            return rule
        return rule.replace(lr=run_annealing(self.update_schedule, self.total_steps, rule.lr))

    def annealed_fallback(self, fallback: UpdateRule) -> UpdateRule:
        """A guard's ``fallback`` annealed over the run as the learned candidate is, so that
        the guard compares like with like in a cool-down (a constant-rate fallback outstrips a
        learned step decaying to 0 on every minibatch comparison, and the guard would undo the
        annealing). Unchanged when the learned side is not annealed, or when the fallback has
        no number ``lr`` to anneal (e.g. the user gave it a schedule of its own)."""
        lr = getattr(fallback, "lr", None)
        if "lr" not in fallback.hyperparameter_names() or not isinstance(lr, (int, float)):
            return fallback
        return self.annealed(fallback)

    def rule(self, device: torch.device) -> UpdateRule:
        if device not in self._rules:
            meta: Params = {k: v.to(device) for k, v in self.meta_params.items()}
            rule = self.lopt.rule(meta)
            self._rules[device] = rule.replace(compiled=True) if self.compile else rule
        return self._rules[device]

    def _rule_type(self) -> type:
        return type(self.lopt.rule(self.meta_params))


def with_ns_dtype(lopt: LOpt, ns_dtype: str, identity: str) -> LOpt:
    """``lopt`` with its Newton–Schulz iteration in ``ns_dtype``, the rest of its config as it
    is (the checkpoint ``identity``'s meta-parameters fit it unchanged). Refused, naming the
    checkpoint, for an architecture without the iteration."""
    config = lopt.config()
    if "ns_dtype" not in config:
        raise ValueError(
            f"ns_dtype={ns_dtype!r}: checkpoint {identity} ({lopt.name}) orthogonalises nothing, "
            "so it has no Newton–Schulz iteration to run in another dtype (leave ns_dtype out)"
        )
    return type(lopt)(**{**config, "ns_dtype": ns_dtype})


class CheckpointedOptimizer(RuleOptimizer):
    """RuleOptimizer whose rule holds a learned optimizer: rebuilt for the device of each param
    group by ``rule_for_device``, with ``identity`` stored in and checked against ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rule_for_device: Callable[[torch.device], UpdateRule],
        identity: dict[str, Any],
        annealed: Callable[[UpdateRule], UpdateRule] = lambda rule: rule,
        **overrides: Any,
    ) -> None:
        self._rule_for_device = rule_for_device
        self._annealed = annealed
        self.identity = identity
        super().__init__(params, rule_for_device(torch.device("cpu")), **overrides)

    def _base_rule(self, group: Mapping[str, Any]) -> UpdateRule:
        return self._rule_for_device(group["params"][0].device)

    def _group_rule(self, group: Mapping[str, Any]) -> UpdateRule:
        # The group's lr (a number LR schedulers scale) times the checkpoint's annealing.
        return self._annealed(super()._group_rule(group))

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
                f"fallback){_shipped_hint(found)}, or start the optimizer afresh"
            )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != IDENTITY_KEY})


def _shipped_hint(identity: Any) -> str:
    """Where the checkpoint of a saved state is shipped, for states saved with a shipped
    checkpoint that is no longer the one asked for (e.g. the previous ``default``)."""
    checkpoint = identity.get("checkpoint") if isinstance(identity, Mapping) else None
    names = shipped_names_of(checkpoint) if isinstance(checkpoint, str) else ()
    return f" (it is shipped as checkpoint={names[0]!r})" if names else ""


class LearnedOptimizer(CheckpointedOptimizer):
    """A meta-trained learned optimizer as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or param-group dicts.
        checkpoint: a shipped checkpoint name (``"default"``, an alias of
            ``"ortho_long_mixture"``; ``"ortho_mlp"`` the default from 2026-12-02 to 2026-12-07,
            ``"mlp_2x32"`` before) or a checkpoint path.
        lr: multiplier on the learned step (what LR schedulers scale).
        total_steps: optimizer steps of the run, for a checkpoint meta-trained with an update
            schedule (see the module docstring); ignored by the others.
        update_schedule: anneal the steps over ``total_steps`` so (``"constant"``,
            ``"cosine"``, ``"linear"``, ``"wsd"``) instead of as the checkpoint's card says.
        ns_dtype: run the Newton–Schulz iteration in this dtype (``"bfloat16"``,
            ``"float32"``, ``"float64"``) instead of the card's; see the module docstring.
        compile: the per-coordinate work through ``torch.compile``; see the module docstring.
    """

    def __init__(
        self,
        params: Iterable[Any],
        checkpoint: str | os.PathLike = "default",
        lr: float = 1.0,
        total_steps: int | None = None,
        update_schedule: str | None = None,
        ns_dtype: str | None = None,
        compile: bool = False,
    ) -> None:
        self.learned = CheckpointedRules(
            checkpoint, total_steps, update_schedule, ns_dtype, compile
        )
        super().__init__(
            params,
            self.learned.rule,
            {"checkpoint": self.learned.id},
            self.learned.annealed,
            lr=lr,
        )
