"""Evaluation suites: held-out tasks from the meta-training family and shifted versions of it.

A suite is a named list of :class:`SuiteEntry` — a task, how many inner steps to train it
(``horizon``) and which instance seeds to run — built from the *meta-training family* (default
:class:`~l2o.tasks.families.MLPFamily` with its default ranges). Suites measure where a learned
optimizer holds (Metz et al., 2022 and the L2O generalisation literature ask the same questions):

=====================  ===========================================================================
``in_distribution``    tasks from the training family itself, at held-out seeds
``horizon_x10``        the same tasks, trained 10x longer than in meta-training
``horizon_x100``       the same tasks, trained 100x longer
``width_x4``           the family with its ``width`` range multiplied by 4
``depth_x3``           the family with its ``depth`` range multiplied by 3
``activation_change``  the family with only activations it was not trained on
``architecture_change`` other architectures: a CNN (an MLP if the family is CNNs), a character LSTM
                       and a character Transformer
``dataset_change``     the family on the datasets it was not trained on (digits <-> MNIST-1D)
``loss_scale_change``  the in-distribution tasks with the loss multiplied by fixed ``loss_scales``
                       (default 1e-3 and 1e3, outside the families' default augmentation range)
``real_models``        what practitioners train, larger and longer than any meta-training task,
                       independent of the family: a GPT-style character Transformer (0.43M
                       parameters, pre-LayerNorm, 2,000 steps), a CNN with GroupNorm, a character
                       LSTM LM, and an MLP autoencoder trained for 10,000 steps
=====================  ===========================================================================

Sampled suites hold at most ``n_tasks`` *distinct* tasks: a family with degenerate ranges
(``width: [32, 32]``) samples the same task at every seed, and a repeat would only run the same
instances again.

Held-out seeds: task ``i`` of a suite is ``family.sample(HELD_OUT_SEED + i)`` and its instances
use seeds ``HELD_OUT_SEED + j`` (``j < MAX_SEEDS``); tuning a baseline's hyper-parameters uses
:func:`tuning_seeds`, from ``TUNING_SEED = HELD_OUT_SEED + MAX_SEEDS`` up, so tuning never sees an
evaluation instance; meta-training draws seeds below ``HELD_OUT_SEED`` (the
estimators draw from ``[0, 2**31 - 1)``), so suites never evaluate a task or an instance seen in
meta-training. Shifted suites sample the shifted family at the same seeds and every draw takes
the same random numbers, so entry ``i`` of ``width_x4`` is entry ``i`` of ``in_distribution``
with (about 4x) wider layers and everything else equal: paired comparisons.

The horizon of an entry is the task's ``horizon`` hint when the family gives one, else the
``horizon`` argument (the meta-training horizon).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from l2o.registry import Registry
from l2o.tasks.augment import LossScaleTask
from l2o.tasks.base import Task, TaskFamily
from l2o.tasks.data import DATASET_NAMES
from l2o.tasks.families import (
    ConvNetFamily,
    MixtureFamily,
    MLPFamily,
    get_family,
)
from l2o.tasks.language import CharLSTMTask, CharTransformerTask
from l2o.tasks.supervised import ACTIVATIONS, AutoencoderTask, ConvNetTask, MLPClassifierTask
from l2o.validation import positive_int

#: First seed of the held-out range (task seeds and instance seeds of every suite).
HELD_OUT_SEED: int = 2**31
#: Most instance seeds a suite entry may have; the tuning seeds start right after them.
MAX_SEEDS: int = 2**30
#: First instance seed used to tune baselines (disjoint from every suite's evaluation seeds).
TUNING_SEED: int = HELD_OUT_SEED + MAX_SEEDS


def tuning_seeds(n: int) -> tuple[int, ...]:
    """The ``n`` instance seeds hyper-parameters are tuned on: ``TUNING_SEED + j``, disjoint from
    the evaluation seeds ``HELD_OUT_SEED + j`` (``j < MAX_SEEDS``) of every suite."""
    positive_int("n", n)
    if n > MAX_SEEDS:
        raise ValueError(f"at most {MAX_SEEDS} tuning seeds, got {n}")
    return tuple(TUNING_SEED + j for j in range(n))


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    """One evaluation problem: train ``task`` for ``horizon`` steps from each of ``seeds``."""

    name: str
    task: Task
    horizon: int
    seeds: tuple[int, ...]

    def config(self) -> dict:
        return {
            "name": self.name,
            "task": self.task.config(),
            "horizon": self.horizon,
            "seeds": list(self.seeds),
        }


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named, ordered collection of :class:`SuiteEntry` (iterable, indexable)."""

    name: str
    entries: tuple[SuiteEntry, ...]

    def __iter__(self) -> Iterator[SuiteEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> SuiteEntry:
        return self.entries[index]

    def config(self) -> dict:
        return {"name": self.name, "entries": [e.config() for e in self.entries]}


def default_family() -> MLPFamily:
    """The default meta-training family: :class:`MLPFamily` with its default (CPU-sized) ranges."""
    return MLPFamily()


# ---------------------------------------------------------------------------------------------
# building blocks


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What every suite builder gets: the training family and the suite's sizes."""

    family: TaskFamily
    n_tasks: int
    seeds: tuple[int, ...]
    horizon: int
    loss_scales: tuple[float, ...]

    def entry(self, name: str, task: Task, horizon_factor: int = 1) -> SuiteEntry:
        horizon = int(getattr(task, "horizon", self.horizon)) * horizon_factor
        return SuiteEntry(name, task, horizon, self.seeds)

    def sampled(self, family: TaskFamily, horizon_factor: int = 1) -> list[SuiteEntry]:
        entries, seen = [], []
        for i in range(self.n_tasks):
            task = family.sample(HELD_OUT_SEED + i)
            entry = self.entry(f"{task.name}#{i}", task, horizon_factor)
            key = (task.config(), entry.horizon)
            if key not in seen:  # a repeat runs the same instances again: no information
                seen.append(key)
                entries.append(entry)
        return entries


def _shift(family: TaskFamily, field: str, change: Callable[[Any], Any], suite: str) -> TaskFamily:
    """``family`` with ``field`` replaced by ``change(field)``; in a mixture, the members that
    have the field are shifted and the others dropped."""
    if isinstance(family, MixtureFamily):
        pairs = [
            (_shift(f, field, change, suite), w)
            for f, w in zip(family.families, family.weights)
            if _has_field(f, field)
        ]
        if not pairs:
            raise ValueError(f"suite {suite!r}: no member of the mixture family has {field!r}")
        return MixtureFamily([f for f, _ in pairs], [w for _, w in pairs])
    if not _has_field(family, field):
        raise ValueError(
            f"suite {suite!r} shifts the family's {field!r}, which {type(family).__name__} "
            f"does not have; use an MLPFamily or ConvNetFamily (or a mixture with one)"
        )
    return family.replace(**{field: change(getattr(family, field))})


def _has_field(family: TaskFamily, field: str) -> bool:
    return dataclasses.is_dataclass(family) and field in {
        f.name for f in dataclasses.fields(family)
    }


def _scaled(factor: int) -> Callable[[tuple[int, int]], tuple[int, int]]:
    return lambda r: (r[0] * factor, r[1] * factor)


def _unseen(known: Sequence[str], what: str, suite: str) -> Callable[[tuple], tuple]:
    def change(seen: tuple) -> tuple:
        unseen = tuple(k for k in known if k not in seen)
        if not unseen:
            raise ValueError(f"suite {suite!r}: the family already trains on every {what}")
        return unseen

    return change


def _first_dataset(family: TaskFamily) -> str:
    members = family.families if isinstance(family, MixtureFamily) else (family,)
    for member in members:
        if _has_field(member, "datasets"):
            return member.datasets[0]
    return DATASET_NAMES[0]


# ---------------------------------------------------------------------------------------------
# the suites


def _in_distribution(spec: _Spec) -> list[SuiteEntry]:
    return spec.sampled(spec.family)


def _horizon_x10(spec: _Spec) -> list[SuiteEntry]:
    return spec.sampled(spec.family, horizon_factor=10)


def _horizon_x100(spec: _Spec) -> list[SuiteEntry]:
    return spec.sampled(spec.family, horizon_factor=100)


def _width_x4(spec: _Spec) -> list[SuiteEntry]:
    return spec.sampled(_shift(spec.family, "width", _scaled(4), "width_x4"))


def _depth_x3(spec: _Spec) -> list[SuiteEntry]:
    return spec.sampled(_shift(spec.family, "depth", _scaled(3), "depth_x3"))


def _activation_change(spec: _Spec) -> list[SuiteEntry]:
    change = _unseen(list(ACTIVATIONS), "activation", "activation_change")
    return spec.sampled(_shift(spec.family, "activations", change, "activation_change"))


def _dataset_change(spec: _Spec) -> list[SuiteEntry]:
    change = _unseen(DATASET_NAMES, "dataset", "dataset_change")
    return spec.sampled(_shift(spec.family, "datasets", change, "dataset_change"))


def _architecture_change(spec: _Spec) -> list[SuiteEntry]:
    dataset = _first_dataset(spec.family)
    trains_cnns = isinstance(spec.family, ConvNetFamily)
    tasks: list[Task] = [
        MLPClassifierTask(dataset=dataset) if trains_cnns else ConvNetTask(dataset=dataset),
        CharLSTMTask(),
        CharTransformerTask(),
    ]
    return [spec.entry(task.name, task) for task in tasks]


def _loss_scale_change(spec: _Spec) -> list[SuiteEntry]:
    entries = []
    for scale in spec.loss_scales:
        for entry in spec.sampled(spec.family):
            task = LossScaleTask(entry.task, scale=scale)
            entries.append(spec.entry(f"{entry.name}*{scale:g}", task))
    return entries


def _real_models(spec: _Spec) -> list[SuiteEntry]:
    # Sized so that a tuned baseline, a learned optimizer and its guarded version all train
    # every model within the `suite=all` budget on 2 CPU cores (EVALUATION.md).
    transformer = CharTransformerTask(d_model=128, n_heads=4, n_layers=2, seq_len=32, batch_size=16)
    entries = [
        (transformer, 2000),
        (ConvNetTask(dataset="digits", channels=(16, 32, 32), norm="group", batch_size=64), 1000),
        (CharLSTMTask(embed_dim=32, hidden_size=128, seq_len=32, batch_size=16), 1000),
        (AutoencoderTask(dataset="digits", width=128, bottleneck=16, batch_size=64), 10000),
    ]
    return [
        SuiteEntry(f"{task.name}:{_size(task)}", task, horizon, spec.seeds)
        for task, horizon in entries
    ]


def _size(task: Task) -> str:
    """A short parameter count for entry names ("0.43M", "15k")."""
    count = sum(p.numel() for p in task.init_from_seed(0).values())
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count / 1e3:.0f}k"


_SUITES: Registry[Callable[[_Spec], list[SuiteEntry]]] = Registry("suite")
for _name, _build in {
    "in_distribution": _in_distribution,
    "horizon_x10": _horizon_x10,
    "horizon_x100": _horizon_x100,
    "width_x4": _width_x4,
    "depth_x3": _depth_x3,
    "activation_change": _activation_change,
    "architecture_change": _architecture_change,
    "dataset_change": _dataset_change,
    "loss_scale_change": _loss_scale_change,
    "real_models": _real_models,
}.items():
    _SUITES.register(_name, _build)


def suite_names() -> tuple[str, ...]:
    """Known suite names, sorted."""
    return _SUITES.names()


def get_suite(
    name: str,
    family: TaskFamily | Mapping[str, Any] | None = None,
    n_tasks: int = 3,
    n_seeds: int = 2,
    horizon: int = 100,
    loss_scales: Sequence[float] = (1e-3, 1e3),
) -> Suite:
    """The suite ``name`` built from the meta-training ``family``.

    Args:
        name: one of :func:`suite_names`.
        family: the meta-training family (a :class:`TaskFamily`, or a config dict for
            :func:`~l2o.tasks.families.get_family`); default :func:`default_family`.
        n_tasks: tasks sampled per suite (``architecture_change`` has one per architecture).
        n_seeds: instance seeds per task (``HELD_OUT_SEED + j``, ``j < n_seeds``).
        horizon: inner steps in meta-training, used when a task carries no ``horizon`` hint.
        loss_scales: the fixed loss multipliers of ``loss_scale_change``.
    """
    build_entries = _SUITES[name]
    if family is None:
        family = default_family()
    elif isinstance(family, Mapping):
        family = get_family(**family)
    elif not isinstance(family, TaskFamily):
        raise TypeError(f"family must be a TaskFamily or a config dict, got {family!r}")
    for arg, value in (("n_tasks", n_tasks), ("n_seeds", n_seeds), ("horizon", horizon)):
        positive_int(arg, value)
    if n_seeds > MAX_SEEDS:
        raise ValueError(f"n_seeds must be <= {MAX_SEEDS}, got {n_seeds}")
    scales = tuple(float(s) for s in loss_scales)
    if not scales or any(not s > 0.0 for s in scales):
        raise ValueError(f"loss_scales must be a non-empty list of positive numbers: {scales!r}")
    spec = _Spec(
        family=family,
        n_tasks=n_tasks,
        seeds=tuple(HELD_OUT_SEED + j for j in range(n_seeds)),
        horizon=horizon,
        loss_scales=scales,
    )
    return Suite(name, tuple(build_entries(spec)))


__all__ = [
    "HELD_OUT_SEED",
    "MAX_SEEDS",
    "TUNING_SEED",
    "Suite",
    "SuiteEntry",
    "default_family",
    "get_suite",
    "suite_names",
    "tuning_seeds",
]
