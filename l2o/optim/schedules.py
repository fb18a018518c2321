"""Learning-rate schedules as pure functions of the step.

A schedule is a small frozen dataclass whose fields are its hyper-parameters and whose
``__call__(step)`` returns the learning rate for the update with 0-based index ``step``. Rules
accept a schedule wherever they accept a float ``lr`` (see :func:`l2o.optim.base.lr_at`), and
because schedules are dataclasses they pickle, compare and build from Hydra configs
(``_target_: l2o.optim.schedules.Cosine``) or by name with :func:`get_schedule`.

Input and output types:

- a Python ``int`` step gives a Python ``float`` (computed in float64), for host-side loops and
  for comparing with ``torch.optim.lr_scheduler``;
- a tensor step gives a tensor of the same shape, elementwise. A floating-point step keeps its
  dtype; an integer step is computed in float64 (float32 on MPS, which has no float64). A 0-dim
  float64 learning rate does not promote float32 parameters (0-dim tensors never win type
  promotion against dimensioned ones), so float32 unrolls stay float32.

Only torch operations are used on tensor steps (no ``.item()``, no data-dependent Python
branches), so a schedule runs inside ``torch.func.vmap`` over a population of tasks that are at
different steps, and inside compiled or differentiated unrolls.

The schedules and their ``torch.optim.lr_scheduler`` twins (tested to agree step by step):

================================  ==============================================
schedule                          twin
================================  ==============================================
:class:`Constant`                 ``ConstantLR(factor=1)``
:class:`StepDecay`                ``StepLR``
:class:`MultiStep`                ``MultiStepLR``
:class:`Exponential`              ``ExponentialLR``
:class:`Polynomial` (``end=0``)   ``PolynomialLR``
:class:`InverseSqrt`              none (fairseq's ``inverse_sqrt`` after warmup)
:class:`LinearWarmup`             ``LinearLR(end_factor=1)``, chained with the inner one
:class:`Cosine`                   ``CosineAnnealingLR`` (for ``step <= total_steps``)
:class:`CosineWarmRestarts`       ``CosineAnnealingWarmRestarts`` (SGDR)
:class:`Cyclic`                   ``CyclicLR``
:class:`Join`                     ``SequentialLR``
================================  ==============================================
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from l2o.optim.base import Step, check_hyperparameter
from l2o.registry import Registry

__all__ = [
    "RUN_ANNEALINGS",
    "Constant",
    "Cosine",
    "CosineWarmRestarts",
    "Cyclic",
    "Exponential",
    "InverseSqrt",
    "Join",
    "LinearWarmup",
    "MultiStep",
    "Polynomial",
    "Schedule",
    "StepDecay",
    "check_update_schedule",
    "get_schedule",
    "run_annealing",
    "schedule_names",
]


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


def _float_dtype_for(step: Tensor) -> torch.dtype:
    if step.is_floating_point():
        return step.dtype
    return torch.float32 if step.device.type == "mps" else torch.float64


@dataclasses.dataclass(frozen=True)
class Schedule(ABC):
    """Base class: ``__call__(step)`` validates and converts the step, ``_lr(t)`` is the math.

    Subclasses implement ``_lr(t)`` for a floating-point tensor ``t`` of steps (any shape) with
    torch operations only.
    """

    name: ClassVar[str] = ""

    def __call__(self, step: Step) -> float | Tensor:
        if isinstance(step, Tensor):
            return self._lr(step.to(_float_dtype_for(step)))
        step = _check_int("step", step, low=0)
        return self._lr(torch.tensor(float(step), dtype=torch.float64)).item()

    @abstractmethod
    def _lr(self, t: Tensor) -> Tensor:
        """The learning rate at float step(s) ``t``."""


def _as_schedule(name: str, value: Any) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Constant(float(value))
    raise ValueError(
        f"{name} must be a Schedule from l2o.optim.schedules or a number, got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class Constant(Schedule):
    """``lr`` at every step."""

    lr: float
    name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)

    def _lr(self, t: Tensor) -> Tensor:
        # Not full_like: lr may be a tensor batched under vmap (a population's tuning grid).
        return torch.zeros_like(t) + self.lr


@dataclasses.dataclass(frozen=True)
class StepDecay(Schedule):
    """``lr * gamma ** floor(step / step_size)`` (``torch.optim.lr_scheduler.StepLR``)."""

    lr: float
    step_size: int
    gamma: float = 0.1
    name: ClassVar[str] = "step_decay"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        object.__setattr__(self, "step_size", _check_int("step_size", self.step_size, low=1))
        check_hyperparameter("gamma", self.gamma)

    def _lr(self, t: Tensor) -> Tensor:
        return self.lr * self.gamma ** torch.div(t, self.step_size, rounding_mode="floor")


@dataclasses.dataclass(frozen=True)
class MultiStep(Schedule):
    """``lr * gamma ** (number of milestones <= step)`` (``MultiStepLR``).

    ``milestones`` must be strictly increasing non-negative integers.
    """

    lr: float
    milestones: tuple[int, ...]
    gamma: float = 0.1
    name: ClassVar[str] = "multistep"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        check_hyperparameter("gamma", self.gamma)
        if isinstance(self.milestones, (str, bytes)) or not hasattr(self.milestones, "__iter__"):
            raise ValueError(f"milestones must be a sequence of integers, got {self.milestones!r}")
        milestones = tuple(_check_int("milestones[i]", m, low=0) for m in self.milestones)
        if not milestones:
            raise ValueError("milestones must not be empty")
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
        object.__setattr__(self, "milestones", milestones)

    def _lr(self, t: Tensor) -> Tensor:
        passed = sum((t >= m).to(t.dtype) for m in self.milestones)
        return self.lr * self.gamma**passed


@dataclasses.dataclass(frozen=True)
class Exponential(Schedule):
    """``lr * gamma ** step`` (``ExponentialLR``)."""

    lr: float
    gamma: float
    name: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        check_hyperparameter("gamma", self.gamma, low_inclusive=False)

    def _lr(self, t: Tensor) -> Tensor:
        return self.lr * self.gamma**t


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
    """``end + (lr - end) * (1 - min(step, total_steps) / total_steps) ** power``.

    Decays from ``lr`` at step 0 to ``end`` at ``total_steps`` and stays there; with
    ``end=0`` it is ``PolynomialLR(total_iters=total_steps, power=power)``. With ``power=1`` and
    ``end > lr`` it is a linear ramp up, the usual first piece of a :class:`Join`.
    """

    lr: float
    total_steps: int
    power: float = 1.0
    end: float = 0.0
    name: ClassVar[str] = "polynomial"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        object.__setattr__(self, "total_steps", _check_int("total_steps", self.total_steps, low=1))
        check_hyperparameter("power", self.power, low_inclusive=False)
        check_hyperparameter("end", self.end)

    def _lr(self, t: Tensor) -> Tensor:
        remaining = 1.0 - torch.clamp(t, 0, self.total_steps) / self.total_steps
        return self.end + (self.lr - self.end) * remaining**self.power


@dataclasses.dataclass(frozen=True)
class InverseSqrt(Schedule):
    """``lr * sqrt(warmup / max(step, warmup))``: flat for ``warmup`` steps, then ``∝ 1/√step``.

    The decay of Vaswani et al. (2017) and fairseq's ``inverse_sqrt``; wrap it in
    :class:`LinearWarmup` with the same ``warmup`` for their linear ramp up to ``lr``.
    """

    lr: float
    warmup: int = 1
    name: ClassVar[str] = "inverse_sqrt"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        object.__setattr__(self, "warmup", _check_int("warmup", self.warmup, low=1))

    def _lr(self, t: Tensor) -> Tensor:
        return self.lr * torch.rsqrt(torch.clamp(t, min=self.warmup) / self.warmup)


@dataclasses.dataclass(frozen=True)
class LinearWarmup(Schedule):
    """``schedule(step) * factor(step)``, ``factor`` rising linearly from ``start_factor`` to 1.

    ``factor(step) = start_factor + (1 - start_factor) * min(step, warmup_steps) / warmup_steps``,
    which is ``LinearLR(start_factor, end_factor=1, total_iters=warmup_steps)``; the inner
    schedule is not shifted (as in ``ChainedScheduler([LinearLR(...), inner])``). To start the
    inner schedule only after the warmup, use :class:`Join`. ``warmup_steps=0`` is no warmup.
    """

    schedule: Schedule
    warmup_steps: int
    start_factor: float = 0.0
    name: ClassVar[str] = "linear_warmup"

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", _as_schedule("schedule", self.schedule))
        object.__setattr__(
            self, "warmup_steps", _check_int("warmup_steps", self.warmup_steps, low=0)
        )
        check_hyperparameter("start_factor", self.start_factor, high=1.0)

    def _lr(self, t: Tensor) -> Tensor:
        inner = self.schedule._lr(t)
        if self.warmup_steps == 0:
            return inner
        progress = torch.clamp(t, 0, self.warmup_steps) / self.warmup_steps
        return inner * (self.start_factor + (1.0 - self.start_factor) * progress)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
    """``eta_min + (lr - eta_min) * (1 + cos(pi * min(step, total_steps) / total_steps)) / 2``.

    Loshchilov & Hutter (2017), without restarts; ``CosineAnnealingLR(T_max=total_steps)`` up to
    ``total_steps``. After ``total_steps`` it stays at ``eta_min`` (``CosineAnnealingLR`` would
    climb back up).
    """

    lr: float
    total_steps: int
    eta_min: float = 0.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        object.__setattr__(self, "total_steps", _check_int("total_steps", self.total_steps, low=1))
        check_hyperparameter("eta_min", self.eta_min)

    def _lr(self, t: Tensor) -> Tensor:
        progress = torch.clamp(t, 0, self.total_steps) / self.total_steps
        return _cosine_between(self.eta_min, self.lr, progress)


def _cosine_between(low: float, high: float, progress: Tensor) -> Tensor:
    return low + (high - low) * (1.0 + torch.cos(math.pi * progress)) / 2.0


@dataclasses.dataclass(frozen=True)
class CosineWarmRestarts(Schedule):
    """SGDR (Loshchilov & Hutter, 2017): cosine from ``lr`` to ``eta_min`` over periods of
    ``T_0``, ``T_0 * T_mult``, ``T_0 * T_mult**2``, ... steps, restarting at ``lr``.

    Period ``n`` starts at ``T_0 * (T_mult**n - 1) / (T_mult - 1)`` (``n * T_0`` when
    ``T_mult == 1``); within it, with ``T_cur`` steps done of ``T_i = T_0 * T_mult**n``,
    ``lr(step) = eta_min + (lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``, as
    ``CosineAnnealingWarmRestarts``.
    """

    lr: float
    T_0: int
    T_mult: int = 1
    eta_min: float = 0.0
    name: ClassVar[str] = "cosine_warm_restarts"

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)
        object.__setattr__(self, "T_0", _check_int("T_0", self.T_0, low=1))
        object.__setattr__(self, "T_mult", _check_int("T_mult", self.T_mult, low=1))
        check_hyperparameter("eta_min", self.eta_min)

    def _lr(self, t: Tensor) -> Tensor:
        t = torch.clamp(t, min=0)
        if self.T_mult == 1:
            t_cur = torch.remainder(t, self.T_0)
            return _cosine_between(self.eta_min, self.lr, t_cur / self.T_0)
        q = float(self.T_mult)
        # Period index from the geometric series; log rounding can put a step that sits
        # exactly on a restart into the previous period, so correct by one either way.
        n = torch.floor(torch.log1p(t / self.T_0 * (q - 1.0)) / math.log(q))

        def period_start(n: Tensor) -> Tensor:
            return self.T_0 * (q**n - 1.0) / (q - 1.0)

        n = n + (t >= period_start(n + 1)).to(t.dtype) - (t < period_start(n)).to(t.dtype)
        t_cur = t - period_start(n)
        return _cosine_between(self.eta_min, self.lr, t_cur / (self.T_0 * q**n))


@dataclasses.dataclass(frozen=True)
class Cyclic(Schedule):
    """Cyclical learning rate (Smith, 2017), as ``torch.optim.lr_scheduler.CyclicLR``.

    Each cycle rises linearly from ``base_lr`` towards ``max_lr`` over ``step_size_up`` steps and
    falls back over ``step_size_down`` (default ``step_size_up``). The amplitude is scaled by
    ``1`` (``"triangular"``), ``1 / 2**(cycle - 1)`` (``"triangular2"``, ``cycle`` counted from
    1) or ``gamma**step`` (``"exp_range"``).
    """

    base_lr: float
    max_lr: float
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0
    name: ClassVar[str] = "cyclic"
    modes: ClassVar[tuple[str, ...]] = ("triangular", "triangular2", "exp_range")

    def __post_init__(self) -> None:
        check_hyperparameter("base_lr", self.base_lr)
        check_hyperparameter("max_lr", self.max_lr)
        object.__setattr__(
            self, "step_size_up", _check_int("step_size_up", self.step_size_up, low=1)
        )
        if self.step_size_down is not None:
            object.__setattr__(
                self, "step_size_down", _check_int("step_size_down", self.step_size_down, low=1)
            )
        if self.mode not in self.modes:
            raise ValueError(f"mode must be one of {', '.join(self.modes)}; got {self.mode!r}")
        check_hyperparameter("gamma", self.gamma, low_inclusive=False)

    def _lr(self, t: Tensor) -> Tensor:
        up = float(self.step_size_up)
        down = float(self.step_size_down if self.step_size_down is not None else up)
        total = up + down
        rise_fraction = up / total
        cycle = torch.floor(1.0 + t / total)
        x = 1.0 + t / total - cycle  # position within the cycle, in [0, 1)
        scale = torch.where(
            x <= rise_fraction, x / rise_fraction, (x - 1.0) / (rise_fraction - 1.0)
        )
        if self.mode == "triangular":
            amplitude = 1.0
        elif self.mode == "triangular2":
            amplitude = 1.0 / 2.0 ** (cycle - 1.0)
        else:
            amplitude = self.gamma**t
        return self.base_lr + (self.max_lr - self.base_lr) * scale * amplitude


@dataclasses.dataclass(frozen=True)
class Join(Schedule):
    """Run ``schedules[i]`` from ``boundaries[i - 1]`` on, each restarted at step 0.

    ``lr(step) = schedules[i](step - boundaries[i - 1])`` where ``i`` is the number of
    boundaries ``<= step`` (``boundaries[-1] = 0``), like optax's ``join_schedules`` and
    ``SequentialLR``. Example, a linear warmup to 1e-3 over 100 steps then a cosine over 900::

        Join((Polynomial(0.0, 100, end=1e-3), Cosine(1e-3, 900)), boundaries=(100,))
    """

    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]
    name: ClassVar[str] = "join"

    def __post_init__(self) -> None:
        if isinstance(self.schedules, (Schedule, str, bytes)) or not hasattr(
            self.schedules, "__iter__"
        ):
            raise ValueError(f"schedules must be a sequence of schedules, got {self.schedules!r}")
        schedules = tuple(_as_schedule("schedules[i]", s) for s in self.schedules)
        if isinstance(self.boundaries, (str, bytes)) or not hasattr(self.boundaries, "__iter__"):
            raise ValueError(f"boundaries must be a sequence of integers, got {self.boundaries!r}")
        boundaries = tuple(_check_int("boundaries[i]", b, low=1) for b in self.boundaries)
        if not schedules:
            raise ValueError("schedules must not be empty")
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"need len(boundaries) == len(schedules) - 1; got {len(boundaries)} boundaries "
                f"for {len(schedules)} schedules"
            )
        if any(b <= a for a, b in itertools.pairwise(boundaries)):
            raise ValueError(f"boundaries must be strictly increasing, got {boundaries}")
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "boundaries", boundaries)

    def _lr(self, t: Tensor) -> Tensor:
        lr = self.schedules[0]._lr(t)
        for boundary, schedule in zip(self.boundaries, self.schedules[1:]):
            # Clamp so the unselected branch never sees a negative step (no NaN under where).
            shifted = schedule._lr(torch.clamp(t - boundary, min=0))
            lr = torch.where(t >= boundary, shifted, lr)
        return lr


_SCHEDULES: Registry[type[Schedule]] = Registry("schedule")
for _cls in (
    Constant,
    StepDecay,
    MultiStep,
    Exponential,
    Polynomial,
    InverseSqrt,
    LinearWarmup,
    Cosine,
    CosineWarmRestarts,
    Cyclic,
    Join,
):
    _SCHEDULES.register(_cls.name, _cls)
_SCHEDULES.alias("sgdr", "cosine_warm_restarts")
_SCHEDULES.alias("step", "step_decay")


def schedule_names() -> tuple[str, ...]:
    """The names :func:`get_schedule` knows, aliases included, sorted."""
    return _SCHEDULES.names(aliases=True)


def get_schedule(name: str, **kwargs: Any) -> Schedule:
    """Build a schedule by name, e.g. ``get_schedule("cosine", lr=1e-3, total_steps=1000)``.

    Names: ``constant``, ``step_decay`` (alias ``step``), ``multistep``, ``exponential``,
    ``polynomial``, ``inverse_sqrt``, ``linear_warmup``, ``cosine``, ``cosine_warm_restarts``
    (alias ``sgdr``), ``cyclic``, ``join``.
    """
    cls = _SCHEDULES[name]
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ValueError(f"bad arguments for schedule {name!r} ({fields}): {err}") from None


#: Shapes of :func:`run_annealing`: how a learned optimizer's steps are scaled over a training
#: run of known length (``constant``: not at all).
RUN_ANNEALINGS = ("constant", "cosine", "linear", "wsd")
#: The share of a run over which ``wsd`` decays (Hägele et al., 2024: a 20% linear cool-down
#: matches a cosine over the whole run).
WSD_DECAY_FRACTION = 0.2


def check_update_schedule(name: str) -> str:
    """``name`` if it is one of :data:`RUN_ANNEALINGS`, else ``ValueError`` naming the key."""
    if name not in RUN_ANNEALINGS:
        raise ValueError(f"update_schedule must be one of {RUN_ANNEALINGS}, got {name!r}")
    return name


def run_annealing(name: str, total_steps: int, lr: float = 1.0) -> Schedule | None:
    """The factor that multiplies every update of a run of ``total_steps`` steps, from ``lr``
    at step 0 to 0 at ``total_steps`` (and 0 after): ``cosine`` (:class:`Cosine`), ``linear``
    (:class:`Polynomial` with ``power=1``), ``wsd`` (:func:`stable_decay`: ``lr`` until the last
    :data:`WSD_DECAY_FRACTION` of the run, then linear to 0), or ``constant`` (None: no
    schedule).

    A learned optimizer meta-trained with one (``estimator.update_schedule``, over each
    episode's drawn length) is told the length of the run it trains, as VeLO is (Metz et al.,
    2022): it need not learn to anneal over a horizon it cannot know, which is where
    horizon-free learned optimizers fail (they keep a constant-size step at the noise floor).
    """
    if check_update_schedule(name) == "constant":
        return None
    if name == "cosine":
        return Cosine(lr=lr, total_steps=total_steps)
    if name == "wsd":
        return stable_decay(lr, total_steps, WSD_DECAY_FRACTION)
    return Polynomial(lr=lr, total_steps=total_steps, power=1.0)


def stable_decay(lr: float, total_steps: int, decay_fraction: float) -> Schedule:
    """``lr`` for the first ``total_steps - d`` steps, then linear to 0 over the last
    ``d = max(1, round(decay_fraction·total_steps))``: the warmup-stable-decay schedule without
    its warmup (Zhai et al., 2022; Hägele et al., 2024).

    Why for a learned optimizer: until the decay starts the run is exactly the horizon-free
    optimizer's, so it keeps its speed over most of the run and anneals only at the end, and a
    run whose length is unknown can use the stable phase alone (as WSD lets a language model's
    training be extended before its cool-down)."""
    total_steps = _check_int("total_steps", total_steps, low=1)
    check_hyperparameter("decay_fraction", decay_fraction, low_inclusive=False, high=1.0)
    # decay_fraction <= 1, so the decay never outlasts the run.
    decay = max(1, round(decay_fraction * total_steps))
    tail = Polynomial(lr=lr, total_steps=decay, power=1.0)
    if decay == total_steps:
        return tail
    return Join((Constant(lr), tail), boundaries=(total_steps - decay,))
