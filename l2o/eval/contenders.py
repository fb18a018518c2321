"""The optimizers ``l2o-eval`` compares ("contenders"), resolved from config before any work.

Four kinds, each with a ``name`` (its label in tables and plots) and a JSON ``spec`` that, with
the learning rate, identifies its runs (the key of a finished cell):

- :class:`LearnedContender`: a learned-optimizer checkpoint (a shipped name or a path), the rule
  ``lopt.rule(meta_params)``; nothing to tune.
- :class:`GuardedContender`: that rule under the LGL2O guard (:class:`~l2o.guard.GuardRule`)
  with a hand-designed fallback whose learning rate is tuned like a baseline's.
- :class:`RuleContender`: a registered hand-designed rule (``adam``, ``muon``, ...), learning
  rate tuned per task when the rule has one.
- :class:`TorchContender`: any ``torch.optim.Optimizer`` subclass by dotted path
  (``torch.optim.AdamW``, a class from an installed package) with keyword arguments, run in a
  plain PyTorch training loop; learning rate tuned when its constructor takes ``lr``.

Every name, path and argument is checked here, so that a typo fails before any cell runs.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from l2o.guard import GuardRule
from l2o.optim import registry
from l2o.optim.base import Params, UpdateRule
from l2o.optim.schedules import check_update_schedule, run_annealing
from l2o.registry import did_you_mean, unknown_keyword

__all__ = [
    "Contender",
    "ContenderError",
    "GuardedContender",
    "LearnedContender",
    "RuleContender",
    "TorchContender",
    "import_optimizer",
    "learned_contenders",
    "rule_contender",
    "torch_contender",
]


class ContenderError(ValueError):
    """An optimizer ``l2o-eval`` cannot build; the message names it."""


@dataclasses.dataclass(frozen=True)
class Contender(abc.ABC):
    """Base class: a label and the JSON identity of the optimizer's runs."""

    name: str

    @property
    def tunes_lr(self) -> bool:
        return False

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """The JSON identity of this optimizer's runs (with the lr, a cell's key)."""


@dataclasses.dataclass(frozen=True)
class RuleContender(Contender):
    """A registered hand-designed rule ``registry.get(rule, lr=lr, **hparams)``."""

    rule: str = "adam"
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Its lr annealed over each run's horizon (:func:`~l2o.optim.schedules.run_annealing`),
    #: to compare with learned optimizers that anneal so.
    update_schedule: str = "constant"

    @property
    def tunes_lr(self) -> bool:
        return "lr" in registry._entry(self.rule).rule_cls.hyperparameter_names()

    def build(
        self, lr: float | torch.Tensor | None = None, horizon: int | None = None
    ) -> UpdateRule:
        hparams = dict(self.hparams)
        if lr is not None:
            hparams["lr"] = lr
        if self.update_schedule != "constant":
            if horizon is None or lr is None:
                raise ValueError(f"{self.name} anneals its lr over the run: give lr and horizon")
            hparams["lr"] = run_annealing(self.update_schedule, horizon, lr)
        return registry.get(self.rule, **hparams)

    def annealed(self, update_schedule: str) -> RuleContender:
        """This rule with its tuned lr annealed over each run as ``update_schedule`` says
        (labelled ``<name>+<schedule>``); itself when the schedule is constant, when it
        anneals already, or when it has no lr to anneal."""
        already = self.update_schedule != "constant"
        if update_schedule == "constant" or already or not self.tunes_lr:
            return self
        return dataclasses.replace(
            self, name=f"{self.name}+{update_schedule}", update_schedule=update_schedule
        )

    def spec(self) -> dict[str, Any]:
        spec = {"kind": "rule", "rule": self.rule, "hparams": dict(self.hparams)}
        if self.update_schedule != "constant":  # (constant rules' cells keep their keys)
            spec["update_schedule"] = self.update_schedule
        return spec


@dataclasses.dataclass(frozen=True)
class LearnedContender(Contender):
    """A learned-optimizer checkpoint: ``lopt.rule(meta_params)``, its updates annealed over
    the run's ``horizon`` when it was meta-trained so (its card's ``update_schedule``)."""

    checkpoint: str = ""
    checkpoint_id: str = ""
    lopt: Any = None
    meta_params: Params = dataclasses.field(default_factory=dict, repr=False)
    card: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    #: Anneal over each run as this says instead of as the card does (None: as the card).
    schedule_override: str | None = None
    #: The Newton–Schulz dtype ``lopt`` was rebuilt with instead of the card's (None: the
    #: card's); part of the cells' key, since it changes the trajectories' rounding.
    ns_dtype_override: str | None = None

    @property
    def update_schedule(self) -> str:
        from l2o.learned.checkpoint import update_schedule_of

        return self.schedule_override or update_schedule_of(self.card)

    def build(self, device: torch.device | str = "cpu", horizon: int | None = None) -> UpdateRule:
        meta = {k: v.to(device) for k, v in self.meta_params.items()}
        if self.update_schedule == "constant":
            return self.lopt.rule(meta)
        if horizon is None:
            raise ValueError(f"{self.name} anneals over its run: build it with the horizon")
        return self.lopt.rule(meta, lr=run_annealing(self.update_schedule, horizon))

    def spec(self) -> dict[str, Any]:
        spec = {"kind": "learned", "checkpoint_id": self.checkpoint_id}
        if self.update_schedule != "constant":  # (cells of constant checkpoints keep their key)
            spec["update_schedule"] = self.update_schedule
        if self.ns_dtype_override is not None:
            spec["ns_dtype"] = self.ns_dtype_override
        return spec


@dataclasses.dataclass(frozen=True)
class GuardedContender(Contender):
    """A learned contender under the LGL2O guard with ``fallback`` (its lr tuned per task);
    ``shadow``: with the guard's fallback-alone shadow run; ``deferred``: comparing on the next
    step's batch (:class:`~l2o.guard.GuardRule`)."""

    learned: LearnedContender | None = None
    fallback: RuleContender | None = None
    compare_every: int = 1
    shadow: bool = False
    deferred: bool = False

    def build(
        self,
        fallback_lr: float | None,
        device: torch.device | str = "cpu",
        horizon: int | None = None,
    ) -> GuardRule:
        return GuardRule(
            self.learned.build(device, horizon),
            self.fallback.build(fallback_lr, horizon),
            compare_every=self.compare_every,
            shadow=self.shadow,
            deferred=self.deferred,
            total_steps=horizon,  # the shadow guard commits to the better run before the end
        )

    def spec(self) -> dict[str, Any]:
        spec = {
            "kind": "guarded",
            "learned": self.learned.spec(),
            "fallback": self.fallback.spec(),
            "compare_every": self.compare_every,
        }
        if self.shadow:  # (cells of plain guards keep their key)
            spec["shadow"] = True
            # Since 2026-12-07 the shadow guard commits to the better run before the end: a
            # different trajectory from the earlier cells', so a different key.
            spec["shadow_finish"] = GuardRule.shadow_finish
        if self.deferred:
            spec["deferred"] = True
        return spec


@dataclasses.dataclass(frozen=True)
class TorchContender(Contender):
    """``cls(params, lr=lr, **kwargs)`` for a ``torch.optim.Optimizer`` subclass ``cls``."""

    target: str = ""
    cls: type[torch.optim.Optimizer] | None = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    tune: bool = True

    @property
    def tunes_lr(self) -> bool:
        return self.tune and "lr" in inspect.signature(self.cls).parameters

    def build(self, params: Sequence[torch.Tensor], lr: float | None) -> torch.optim.Optimizer:
        kwargs = dict(self.kwargs)
        if lr is not None:
            kwargs["lr"] = lr
        return self.cls(params, **kwargs)

    def spec(self) -> dict[str, Any]:
        return {"kind": "torch", "target": self.target, "kwargs": dict(self.kwargs)}


# --- resolving names ----------------------------------------------------------------------------


def rule_contender(
    rule: str, hparams: Mapping[str, Any] | None = None, update_schedule: str = "constant"
) -> RuleContender | TorchContender:
    """A registered rule; unknown names and hyper-parameters raise :class:`ContenderError`. A
    rule that cannot run under vmap (L-BFGS) comes back as its ``torch.optim`` class, run in the
    plain training loop. ``update_schedule``: its tuned lr annealed over each run (labelled
    ``<rule>+<schedule>``)."""
    hparams = dict(hparams or {})
    try:
        check_update_schedule(update_schedule)
    except ValueError as err:
        raise ContenderError(f"optimizer {rule!r}: {err}") from None
    try:
        entry = registry._entry(rule)
    except ValueError as err:
        raise ContenderError(str(err)) from None
    known = entry.rule_cls.hyperparameter_names()
    for key in hparams:
        if key not in known:
            raise ContenderError(
                f"optimizer {rule!r} has no hyper-parameter {key!r}{did_you_mean(key, known)}; "
                f"it has: {', '.join(known)}"
            )
    if "lr" in hparams:
        raise ContenderError(f"optimizer {rule!r}: lr is tuned per task; remove it from hparams")
    try:
        built = registry.get(rule, **hparams)
    except (TypeError, ValueError) as err:
        raise ContenderError(f"optimizer {rule!r} with {hparams}: {err}") from None
    needs = built.loss_fn_requirements()
    if needs:
        raise ContenderError(
            f"optimizer {rule!r} needs a loss function that gives {', '.join(sorted(needs))} "
            "(residuals, layer statistics or resampled labels); l2o-eval's tasks give the loss "
            "as a function of the parameters only"
        )
    label = rule + "".join(f",{k}={v}" for k, v in sorted(hparams.items()))
    if update_schedule != "constant":
        if not entry.rule_cls.vmappable or "lr" not in known:
            raise ContenderError(
                f"optimizer {rule!r}: update_schedule needs a vmappable rule with an lr"
            )
        return RuleContender(label, rule, hparams).annealed(update_schedule)
    if not entry.rule_cls.vmappable:
        return TorchContender(label, f"l2o.optim.registry:{rule}", entry.optimizer_cls, hparams)
    return RuleContender(label, rule, hparams)


def import_optimizer(target: str) -> type[torch.optim.Optimizer]:
    """The ``torch.optim.Optimizer`` subclass at dotted path ``target`` (``torch.optim.AdamW``)."""
    module_name, _, attr = str(target).rpartition(".")
    if not module_name:
        raise ContenderError(
            f"optimizer target {target!r} is not a dotted path (e.g. torch.optim.AdamW)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ContenderError(
            f"optimizer target {target!r}: cannot import {module_name!r} ({err}); is the package "
            "installed?"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        public = [n for n in dir(module) if not n.startswith("_")]
        raise ContenderError(
            f"optimizer target {target!r}: module {module_name!r} has no {attr!r}"
            f"{did_you_mean(attr, public)}"
        )
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ContenderError(f"optimizer target {target!r} is not a torch.optim.Optimizer class")
    return cls


def torch_contender(
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    tune_lr: bool = True,
) -> TorchContender:
    """An external optimizer class; its keyword arguments are checked against its signature."""
    cls = import_optimizer(target)
    kwargs = dict(kwargs or {})
    problem = unknown_keyword(cls, kwargs, skip=("params",))
    if problem:
        raise ContenderError(f"optimizer {target}: {problem}")
    if tune_lr and "lr" in kwargs:
        raise ContenderError(
            f"optimizer {target}: lr is tuned per task; remove it from kwargs or set tune_lr: false"
        )
    try:  # construct once on a dummy parameter: bad values fail now, not after an hour
        cls([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ContenderError(f"optimizer {target} with {kwargs}: {err}") from None
    return TorchContender(name or cls.__name__, target, cls, kwargs, tune_lr)


def learned_contenders(
    checkpoint: str,
    *,
    guarded: bool,
    unguarded: bool,
    fallback: RuleContender,
    compare_every: int = 1,
    shadow: bool = False,
    deferred: bool = False,
    update_schedule: str | None = None,
    ns_dtype: str | None = None,
) -> list[Contender]:
    """The checkpoint (shipped name or path) alone and/or under the guard (``shadow``: with the
    guard's fallback-alone shadow run, labelled ``+guard(<fallback>,shadow)``; ``deferred``:
    comparing on the next batch, ``+guard(<fallback>,deferred)``); ``update_schedule``
    anneals it over each run otherwise than its card says (labelled ``<name>+<schedule>``),
    e.g. to try a checkpoint meta-trained without annealing with a cosine over the run;
    ``ns_dtype`` runs its Newton–Schulz iteration in that dtype instead of the card's (labelled
    ``<name>+<dtype> NS``; :func:`l2o.learned.optimizer.with_ns_dtype`)."""
    from l2o.learned.checkpoint import (
        CheckpointError,
        load_checkpoint,
        resolve_checkpoint,
        update_schedule_of,
    )
    from l2o.learned.optimizer import with_ns_dtype

    try:
        lopt, meta_params, card = load_checkpoint(resolve_checkpoint(checkpoint))
    except CheckpointError as err:
        raise ContenderError(f"checkpoint {checkpoint!r}: {err}") from None
    label = str(checkpoint) if "/" not in str(checkpoint) else card["id"]
    try:  # a bad name, in the card or the config, fails before any cell runs
        trained_with = check_update_schedule(update_schedule_of(card))
        override = None if update_schedule is None else check_update_schedule(update_schedule)
    except ValueError as err:
        raise ContenderError(f"checkpoint {checkpoint!r}: {err}") from None
    if override == trained_with:
        override = None
    if override is not None:
        label = f"{label}+{override}"
    if ns_dtype is not None and ns_dtype == lopt.config().get("ns_dtype"):
        ns_dtype = None  # the card's own: the same cells as without it
    if ns_dtype is not None:
        try:
            lopt = with_ns_dtype(lopt, ns_dtype, card["id"])
        except ValueError as err:
            raise ContenderError(f"checkpoint {checkpoint!r}: {err}") from None
        label = f"{label}+{ns_dtype} NS"
    learned = LearnedContender(
        label, str(checkpoint), card["id"], lopt, meta_params, card, override, ns_dtype
    )
    out: list[Contender] = [learned] if unguarded else []
    if guarded:
        # The fallback (and so the shadow run) anneals as the learned candidate does: a
        # constant-rate fallback outstrips a learned step decaying to 0 on every comparison in
        # the cool-down, and the guard would undo the annealing (EVALUATION.md, 2026-12-03).
        fallback = fallback.annealed(learned.update_schedule)
        modes = [mode for mode, on in (("deferred", deferred), ("shadow", shadow)) if on]
        guard = ",".join([fallback.name, *modes])
        out.append(
            GuardedContender(
                f"{label}+guard({guard})", learned, fallback, compare_every, shadow, deferred
            )
        )
    return out
