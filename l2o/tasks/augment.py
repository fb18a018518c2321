"""Task augmentation: wrappers that change how a task looks to an optimizer, not what it solves.

Learned optimizers overfit to the parameter and loss scales of their meta-training tasks. Metz
et al. (2022, "Practical tradeoffs between memory, compute, and performance in learned
optimizers") and ``learned_optimization``'s task augmentations randomise those scales during
meta-training so the learned rule has to be scale-robust. Two wrappers, each a :class:`Task`:

* :class:`ReparamTask` — trains ``f(c ⊙ θ)`` instead of ``f(θ)``, a random positive scale ``c_k``
  per parameter tensor. The stored parameters start at ``θ0_k / c_k`` so the network computes
  the same function at init; the gradient seen by the optimizer is ``c_k ∇f``, and a step of
  size ``η`` in ``θ`` moves the effective weights by ``c_k η``.
* :class:`LossScaleTask` — trains ``s · f(θ)``. Under autodiff, scaling the loss scales every
  gradient by the same ``s`` (``∇(s f) = s ∇f``), so a separate "gradient scale" augmentation
  would be identical for the optimizer; this one wrapper covers both and also keeps the loss
  values a rule sees (the guard's comparisons, line searches) consistent with the gradients.

Scales are per *instance*: drawn log-uniformly from the instance seed and delivered as the last
element of the batch, so one ``vmap`` runs a population whose members have different scales and
``loss(params, batch)`` stays pure. ``init`` must get a generator seeded with the instance seed
(as :meth:`Task.init_from_seed` and :meth:`Task.population_init` do): :class:`ReparamTask` reads
``generator.initial_seed()`` to divide the initial parameters by that instance's scales.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor

from l2o.optim.base import Params
from l2o.tasks.base import Batch, Task
from l2o.tasks.data import seeded_generator
from l2o.validation import log_uniform

# Salts keep the scale streams unrelated to the base task's streams from the same seed.
_REPARAM_SALT = 0x5CA1E
_LOSS_SCALE_SALT = 0x1055


def check_log_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` as floats; raise ``ValueError`` naming ``name`` unless ``0 < lo <= hi``."""
    if isinstance(value, str) or len(value) != 2:
        raise ValueError(f"{name} must be a (lo, hi) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0.0:
        raise ValueError(f"{name} must be finite and positive, got {value!r}")
    if lo > hi:
        raise ValueError(f"{name} must have lo <= hi, got {value!r}")
    return lo, hi


class TaskWrapper(Task):
    """A task that delegates to ``base``, appending one tensor of per-instance scales to the batch.

    Subclasses implement :meth:`scales` (the appended tensor of instance ``seed``) and
    :meth:`loss`. Device, dtype and any ``horizon`` hint are the base task's.
    """

    augmentation: str = "wrapper"

    def __init__(self, base: Task) -> None:
        if not isinstance(base, Task):
            raise TypeError(f"base must be a Task, got {type(base).__name__}")
        self.base = base
        self.name = f"{base.name}+{self.augmentation}"
        if hasattr(base, "horizon"):
            self.horizon = base.horizon

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.base.dtype

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        self.base.dtype = value

    @abstractmethod
    def scales(self, seed: int) -> Tensor:
        """The instance's augmentation scales (the last element of its batches)."""

    def batch(self, seed: int, step: int, split: str = "train") -> Batch:
        return (*self.base.batch(seed, step, split), self.scales(seed))

    def population_batch(self, seeds: Sequence[int], step: int, split: str = "train") -> Batch:
        scales = torch.stack([self.scales(s) for s in seeds])
        return (*self.base.population_batch(seeds, step, split), scales)

    def population_batches(
        self, seeds: Sequence[int], first_steps: Sequence[int], num_steps: int, split: str = "train"
    ) -> Batch:
        base = self.base.population_batches(seeds, first_steps, num_steps, split)
        scales = torch.stack([self.scales(s) for s in seeds])
        return (*base, torch.stack([scales] * num_steps))

    def to(self, device: torch.device | str) -> TaskWrapper:
        self.base.to(device)
        return self


class ReparamTask(TaskWrapper):
    """Train ``f(c ⊙ θ)``: each parameter tensor ``k`` is multiplied by ``c_k`` inside the loss.

    ``c_k ~ logU(scale_range)`` per tensor and per instance (from the instance seed); the initial
    parameters are ``θ0_k / c_k`` where ``θ0`` is the base task's init, so the effective weights
    ``c ⊙ θ`` start exactly where the base task's do. The batch is ``(*base_batch, c)`` with ``c``
    of shape ``(num_tensors,)`` in sorted parameter-name order.
    """

    augmentation = "reparam"

    def __init__(self, base: Task, scale_range: Sequence[float] = (1e-3, 1e3)) -> None:
        super().__init__(base)
        self.scale_range = check_log_range("scale_range", scale_range)
        self._names: dict[str, int] | None = None

    def _index(self) -> dict[str, int]:
        # Position of each parameter tensor's scale in ``c`` (sorted names).
        if self._names is None:
            self._names = {k: i for i, k in enumerate(sorted(self.base.init_from_seed(0)))}
        return self._names

    def scales(self, seed: int) -> Tensor:
        """The per-tensor scales ``c`` of instance ``seed``, shape ``(num_tensors,)``."""
        generator = seeded_generator(_REPARAM_SALT, seed)
        c = log_uniform(generator, *self.scale_range, len(self._index()))
        return c.to(self.device, self.dtype)

    def init(self, generator: torch.Generator) -> Params:
        c = self.scales(generator.initial_seed())
        index = self._index()
        return {k: v / c[index[k]] for k, v in self.base.init(generator).items()}

    def effective_params(self, params: Params, scales: Tensor) -> Params:
        """``c ⊙ θ``: the parameters the base task's loss sees."""
        index = self._index()
        return {k: v * scales[index[k]] for k, v in params.items()}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        return self.base.loss(self.effective_params(params, batch[-1]), batch[:-1])

    def config(self) -> dict:
        return {"name": "reparam", "base": self.base.config(), "scale_range": [*self.scale_range]}


class LossScaleTask(TaskWrapper):
    """Train ``s · f(θ)`` with a fixed ``scale`` or ``s ~ logU(scale_range)`` per instance.

    Give exactly one of ``scale`` and ``scale_range``. Gradients scale by ``s`` too, so this is
    also the gradient-scale augmentation. The batch is ``(*base_batch, s)`` with ``s`` 0-dim;
    held-out losses (``eval_loss``) are scaled as well: the scaled problem is the task.
    """

    augmentation = "loss_scale"

    def __init__(
        self,
        base: Task,
        scale: float | None = None,
        scale_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__(base)
        if (scale is None) == (scale_range is None):
            raise ValueError("give exactly one of scale (fixed) and scale_range (random)")
        if scale is not None:
            check_log_range("scale", (scale, scale))
        self.scale = None if scale is None else float(scale)
        self.scale_range = (
            None if scale_range is None else check_log_range("scale_range", scale_range)
        )

    def scales(self, seed: int) -> Tensor:
        """The loss scale ``s`` of instance ``seed`` (0-dim)."""
        if self.scale_range is None:
            s = torch.tensor(self.scale, dtype=torch.float64)
        else:
            s = log_uniform(seeded_generator(_LOSS_SCALE_SALT, seed), *self.scale_range, 1)[0]
        return s.to(self.device, self.dtype)

    def init(self, generator: torch.Generator) -> Params:
        return self.base.init(generator)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        return batch[-1] * self.base.loss(params, batch[:-1])

    def config(self) -> dict:
        config: dict = {"name": "loss_scale", "base": self.base.config()}
        if self.scale is not None:
            config["scale"] = self.scale
        else:
            config["scale_range"] = [*self.scale_range]
        return config
