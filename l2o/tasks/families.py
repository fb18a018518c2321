"""Task families: parametric distributions over tasks, sampled by seed.

A family turns a seed into one task structure (dataset, width, depth, activation, batch size,
init scale, ...) and, optionally, task augmentations (:mod:`l2o.tasks.augment`). Meta-training
draws many tasks from a family so the learned optimizer sees variety; evaluation suites
(:mod:`l2o.tasks.suites`) draw held-out tasks from it and from shifted versions of it.

Every family is a frozen dataclass whose fields are the ranges it samples from:

* ``(lo, hi)`` ranges (a single number means ``(v, v)``): sizes and scales are drawn
  log-uniformly (``width``, ``batch_size``, ``init_scale``, ``dim``, ``cond``, ``horizon``),
  counts uniformly (``depth``); integers are rounded down inside ``[lo, hi]``;
* lists of choices (``datasets``, ``activations``): one drawn uniformly;
* augmentation probabilities: with probability ``reparam_prob`` the task is wrapped in
  :class:`~l2o.tasks.augment.ReparamTask` (per-tensor scales ~ logU(``reparam_range``)), and
  with probability ``loss_scale_prob`` in :class:`~l2o.tasks.augment.LossScaleTask`
  (scale ~ logU(``loss_scale_range``)), following the task augmentations of Metz et al. (2022).

If ``horizon`` is given, the sampled task carries ``task.horizon`` (an int): a hint of how many
inner steps to train it for. ``sample(seed)`` is deterministic; ``replace(**changes)`` gives a
shifted family (validated again), which is how suites build out-of-distribution axes.
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from l2o.registry import Registry, did_you_mean
from l2o.tasks.augment import LossScaleTask, ReparamTask
from l2o.tasks.base import Task, TaskFamily
from l2o.tasks.data import DATASET_NAMES, seeded_generator
from l2o.tasks.language import CharLSTMTask, CharTransformerTask
from l2o.tasks.supervised import ACTIVATIONS, ConvNetTask, MLPClassifierTask
from l2o.tasks.synthetic import QuadraticTask
from l2o.validation import log_uniform

# Salts: a family's draws and a mixture's choice use streams unrelated to the tasks' own.
_FAMILY_SALT = 0xFA417
_MIXTURE_SALT = 0x313C

Range = tuple[float, float]


# ---------------------------------------------------------------------------------------------
# validation


def _fail(family: str, name: str, message: str, value: Any) -> ValueError:
    return ValueError(f"{family}: {name} {message}, got {value!r}")


def _as_range(
    family: str, name: str, value: Any, *, integer: bool, low: float, strict: bool = False
) -> Range:
    """``value`` (a number or a pair) as a validated ``(lo, hi)``: ``low <= lo <= hi``, or
    ``low < lo`` if ``strict``."""
    pair = (value, value) if isinstance(value, (int, float)) else value
    if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
        raise _fail(family, name, "must be a number or a (lo, hi) pair", value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(family, name, "must hold finite numbers", value)
        if integer and int(v) != v:
            raise _fail(family, name, "must hold integers", value)
    lo, hi = (int(v) if integer else float(v) for v in pair)
    if lo < low or (strict and lo == low):
        raise _fail(family, name, f"must have lo {'>' if strict else '>='} {low}", value)
    if lo > hi:
        raise _fail(family, name, "must have lo <= hi", value)
    return lo, hi


def _positive_range(family: str, name: str, value: Any) -> Range:
    return _as_range(family, name, value, integer=False, low=0.0, strict=True)


def _as_choices(family: str, name: str, value: Any, known: Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    choices = tuple(value)
    if not choices:
        raise _fail(family, name, "must be a non-empty list", value)
    for choice in choices:
        if choice not in known:
            raise _fail(family, name, f"entries must be among {sorted(known)}", value)
    return choices


def _as_probability(family: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise _fail(family, name, "must be a probability in [0, 1]", value)
    return float(value)


# ---------------------------------------------------------------------------------------------
# draws


def _uniform_int(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(int(lo), int(hi) + 1, (1,), generator=g))


def _log_uniform_int(g: torch.Generator, lo: int, hi: int) -> int:
    # log-uniform over the real interval [lo, hi + 1), rounded down: every integer reachable.
    return min(int(hi), math.floor(log_uniform(g, lo, hi + 1)))


def _choice(g: torch.Generator, choices: Sequence[Any]) -> Any:
    return choices[_uniform_int(g, 0, len(choices) - 1)]


# ---------------------------------------------------------------------------------------------
# families


@dataclasses.dataclass(frozen=True)
class SampledFamily(TaskFamily):
    """Shared fields and sampling of the parametric families (augmentations and horizon).

    Subclasses add their own ranges, validate them in :meth:`_validate` and build the base task
    in :meth:`_build` from a generator; :meth:`sample` then applies augmentations and the
    horizon hint, always drawing in the same order so a seed always gives the same task.
    """

    horizon: Any = None
    reparam_prob: float = 0.0
    reparam_range: Any = (1e-2, 1e2)
    loss_scale_prob: float = 0.0
    loss_scale_range: Any = (1e-2, 1e2)

    name: ClassVar[str] = "sampled"

    def __post_init__(self) -> None:
        family = type(self).__name__
        if self.horizon is not None:
            self._set("horizon", _as_range(family, "horizon", self.horizon, integer=True, low=1))
        self._set("reparam_prob", _as_probability(family, "reparam_prob", self.reparam_prob))
        self._set("reparam_range", _positive_range(family, "reparam_range", self.reparam_range))
        self._set(
            "loss_scale_prob", _as_probability(family, "loss_scale_prob", self.loss_scale_prob)
        )
        self._set(
            "loss_scale_range",
            _positive_range(family, "loss_scale_range", self.loss_scale_range),
        )
        self._validate(family)

    def _set(self, field: str, value: Any) -> None:
        object.__setattr__(self, field, value)

    @abstractmethod
    def _validate(self, family: str) -> None:
        """Check the family-specific fields (``family`` names it in errors)."""

    @abstractmethod
    def _build(self, g: torch.Generator) -> Task:
        """The task whose structure is drawn from ``g``."""

    def sample(self, seed: int) -> Task:
        """The task drawn by ``seed``: base structure, then augmentations, then horizon."""
        g = seeded_generator(_FAMILY_SALT, seed)
        task = self._build(g)
        # Draw every coin even when its probability is 0 so adding an augmentation to a family
        # does not change which base tasks its seeds give.
        reparam = float(torch.rand((), generator=g)) < self.reparam_prob
        loss_scale = float(torch.rand((), generator=g)) < self.loss_scale_prob
        horizon = _log_uniform_int(g, *self.horizon) if self.horizon is not None else None
        if reparam:
            task = ReparamTask(task, self.reparam_range)
        if loss_scale:
            task = LossScaleTask(task, scale_range=self.loss_scale_range)
        if horizon is not None:
            task.horizon = horizon
        return task

    def replace(self, **changes: Any) -> SampledFamily:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def config(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": self.name, **_jsonable(fields)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, TaskFamily):
        return value.config()
    return value


@dataclasses.dataclass(frozen=True)
class _NetworkFamily(SampledFamily):
    """Networks on the offline datasets: dataset and activation drawn uniformly from the lists,
    ``depth`` uniformly, ``width``, ``batch_size`` and ``init_scale`` log-uniformly."""

    datasets: Any = ("digits",)
    width: Any = (16, 64)
    depth: Any = (1, 2)
    activations: Any = ("relu", "tanh")
    batch_size: Any = (32, 128)
    init_scale: Any = (0.5, 2.0)

    min_depth: ClassVar[int] = 0

    def _validate(self, family: str) -> None:
        self._set("datasets", _as_choices(family, "datasets", self.datasets, DATASET_NAMES))
        self._set("width", _as_range(family, "width", self.width, integer=True, low=1))
        self._set("depth", _as_range(family, "depth", self.depth, integer=True, low=self.min_depth))
        self._set(
            "activations", _as_choices(family, "activations", self.activations, list(ACTIVATIONS))
        )
        self._set(
            "batch_size", _as_range(family, "batch_size", self.batch_size, integer=True, low=1)
        )
        self._set("init_scale", _positive_range(family, "init_scale", self.init_scale))


@dataclasses.dataclass(frozen=True)
class MLPFamily(_NetworkFamily):
    """MLP classifiers (:class:`~l2o.tasks.supervised.MLPClassifierTask`): ``depth`` hidden
    layers of ``width`` units (depth 0 is logistic regression)."""

    name: ClassVar[str] = "mlp"

    def _build(self, g: torch.Generator) -> Task:
        return MLPClassifierTask(
            dataset=_choice(g, self.datasets),
            width=_log_uniform_int(g, *self.width),
            depth=_uniform_int(g, *self.depth),
            activation=_choice(g, self.activations),
            batch_size=_log_uniform_int(g, *self.batch_size),
            init_scale=log_uniform(g, *self.init_scale),
        )


@dataclasses.dataclass(frozen=True)
class ConvNetFamily(_NetworkFamily):
    """Small CNNs (:class:`~l2o.tasks.supervised.ConvNetTask`): ``depth`` stride-2 convolutions
    of ``width`` channels each (2-D on digits, 1-D on MNIST-1D)."""

    width: Any = (4, 16)

    name: ClassVar[str] = "cnn"
    min_depth: ClassVar[int] = 1

    def _build(self, g: torch.Generator) -> Task:
        dataset = _choice(g, self.datasets)
        width = _log_uniform_int(g, *self.width)
        depth = _uniform_int(g, *self.depth)
        return ConvNetTask(
            dataset=dataset,
            channels=[width] * depth,
            activation=_choice(g, self.activations),
            batch_size=_log_uniform_int(g, *self.batch_size),
            init_scale=log_uniform(g, *self.init_scale),
        )


@dataclasses.dataclass(frozen=True)
class QuadraticFamily(SampledFamily):
    """Random quadratics (:class:`~l2o.tasks.synthetic.QuadraticTask`): ``dim`` and condition
    number ``cond`` log-uniform, gradient ``noise_std`` uniform, ``init_scale`` log-uniform."""

    dim: Any = (2, 20)
    cond: Any = (1.0, 1e3)
    noise_std: Any = (0.0, 0.0)
    init_scale: Any = (1.0, 1.0)

    name: ClassVar[str] = "quadratic"

    def _validate(self, family: str) -> None:
        self._set("dim", _as_range(family, "dim", self.dim, integer=True, low=1))
        self._set("cond", _as_range(family, "cond", self.cond, integer=False, low=1.0))
        self._set(
            "noise_std", _as_range(family, "noise_std", self.noise_std, integer=False, low=0.0)
        )
        self._set("init_scale", _positive_range(family, "init_scale", self.init_scale))

    def _build(self, g: torch.Generator) -> Task:
        lo, hi = self.noise_std
        return QuadraticTask(
            dim=_log_uniform_int(g, *self.dim),
            cond=log_uniform(g, *self.cond),
            noise_std=lo + float(torch.rand((), generator=g, dtype=torch.float64)) * (hi - lo),
            init_scale=log_uniform(g, *self.init_scale),
        )


@dataclasses.dataclass(frozen=True)
class CharLMFamily(SampledFamily):
    """Small next-character language models on the stdlib-source corpus
    (:mod:`l2o.tasks.language`), the sequence models of a task mixture: the model drawn
    uniformly from ``models`` (``lstm``: :class:`~l2o.tasks.language.CharLSTMTask` with
    ``width`` hidden units and embeddings of ``width // 2``; ``transformer``:
    :class:`~l2o.tasks.language.CharTransformerTask` with ``d_model`` ``width`` rounded down to
    an even number, 2 heads and ``depth`` blocks), ``width``, ``seq_len`` and ``batch_size``
    log-uniformly, ``depth`` uniformly."""

    MODELS: ClassVar[tuple[str, ...]] = ("lstm", "transformer")

    models: Any = MODELS
    width: Any = (16, 48)
    depth: Any = (1, 2)
    seq_len: Any = (16, 32)
    batch_size: Any = (8, 32)

    name: ClassVar[str] = "char_lm"

    def _validate(self, family: str) -> None:
        self._set("models", _as_choices(family, "models", self.models, self.MODELS))
        self._set("width", _as_range(family, "width", self.width, integer=True, low=2))
        self._set("depth", _as_range(family, "depth", self.depth, integer=True, low=1))
        self._set("seq_len", _as_range(family, "seq_len", self.seq_len, integer=True, low=1))
        self._set(
            "batch_size", _as_range(family, "batch_size", self.batch_size, integer=True, low=1)
        )

    def _build(self, g: torch.Generator) -> Task:
        model = _choice(g, self.models)
        width = _log_uniform_int(g, *self.width)
        depth = _uniform_int(g, *self.depth)
        seq_len = _log_uniform_int(g, *self.seq_len)
        batch_size = _log_uniform_int(g, *self.batch_size)
        if model == "lstm":
            return CharLSTMTask(
                embed_dim=max(1, width // 2),
                hidden_size=width,
                seq_len=seq_len,
                batch_size=batch_size,
            )
        return CharTransformerTask(
            d_model=width - width % 2,
            n_heads=2,
            n_layers=depth,
            seq_len=seq_len,
            batch_size=batch_size,
        )


@dataclasses.dataclass(frozen=True)
class MixtureFamily(TaskFamily):
    """Draw a member family (with probabilities ``weights``, default uniform), then a task from
    it with the same seed. Augmentations and horizons are the members' own."""

    families: Any = ()
    weights: Any = None

    name: ClassVar[str] = "mixture"

    def __post_init__(self) -> None:
        families = tuple(self.families)
        if not families or not all(isinstance(f, TaskFamily) for f in families):
            raise _fail(
                "MixtureFamily", "families", "must be a non-empty list of families", families
            )
        object.__setattr__(self, "families", families)
        if self.weights is None:
            weights = (1.0,) * len(families)
        else:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != len(families):
                raise _fail("MixtureFamily", "weights", "must have one entry per family", weights)
            if any(not (w >= 0.0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
                raise _fail("MixtureFamily", "weights", "must be >= 0 with a positive sum", weights)
        object.__setattr__(self, "weights", weights)

    def sample(self, seed: int) -> Task:
        g = seeded_generator(_MIXTURE_SALT, seed)
        index = int(torch.multinomial(torch.tensor(self.weights), 1, generator=g))
        return self.families[index].sample(seed)

    def replace(self, **changes: Any) -> MixtureFamily:
        return dataclasses.replace(self, **changes)

    def config(self) -> dict:
        return {
            "name": self.name,
            "families": [f.config() for f in self.families],
            "weights": list(self.weights),
        }


# ---------------------------------------------------------------------------------------------
# registry

_FAMILIES: Registry[type[TaskFamily]] = Registry("task family", "task families")
for _cls in (MLPFamily, ConvNetFamily, CharLMFamily, QuadraticFamily, MixtureFamily):
    _FAMILIES.register(_cls.name, _cls)


def family_names() -> tuple[str, ...]:
    """Registered family names, sorted."""
    return _FAMILIES.names()


def get_family(name: str, **kwargs: Any) -> TaskFamily:
    """A new family ``name`` with fields ``kwargs`` (``get_family(**family.config())`` rebuilds
    a parametric family). Unknown names and fields raise ``ValueError`` listing what exists."""
    cls = _FAMILIES[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in fields:
            raise ValueError(
                f"task family {name!r} has no field {key!r}{did_you_mean(key, fields)}; "
                f"fields: {', '.join(fields)}"
            )
    if cls is MixtureFamily and "families" in kwargs:
        kwargs = {
            **kwargs,
            "families": [
                f if isinstance(f, TaskFamily) else get_family(**f) for f in kwargs["families"]
            ],
        }
    return cls(**kwargs)
