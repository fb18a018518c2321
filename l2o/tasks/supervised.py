"""Supervised tasks on the offline datasets: logistic regression, MLPs, small CNNs, autoencoders.

Each task keeps an ``nn.Module`` *template* built on the ``meta`` device (no memory, no draw from
the global RNG) and evaluates it with ``torch.func.functional_call(template, params, x)``, so
``params`` is a plain dict keyed like ``template.named_parameters()`` and a population of
instances is one ``vmap``. There are no buffers (no BatchNorm running statistics) and no dropout:
the loss is a pure function of ``(params, batch)``.

Initialisation is fan-in scaled and drawn from the instance generator only:
W ~ N(0, (init_scale · gain / √fan_in)²), b = 0, where ``gain`` is the gain of the activation that
follows the layer (√2 for ReLU-like, 5/3 for tanh, 1 for none), as in He et al. (2015).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from l2o.optim.base import Params
from l2o.tasks.base import Batch, Task
from l2o.tasks.data import (
    Dataset,
    batch_indices,
    check_dataset_name,
    check_split,
    load_dataset,
    stacked_batch_indices,
)
from l2o.validation import positive_int

#: Activation name -> (module class, fan-in init gain).
ACTIVATIONS: dict[str, tuple[type[nn.Module], float]] = {
    "relu": (nn.ReLU, math.sqrt(2.0)),
    "leaky_relu": (nn.LeakyReLU, math.sqrt(2.0 / (1.0 + 0.01**2))),
    "elu": (nn.ELU, math.sqrt(2.0)),
    "gelu": (nn.GELU, math.sqrt(2.0)),
    "silu": (nn.SiLU, math.sqrt(2.0)),
    "softplus": (nn.Softplus, 1.0),
    "tanh": (nn.Tanh, 5.0 / 3.0),
    "sigmoid": (nn.Sigmoid, 1.0),
}
_GAIN_OF = {cls: gain for cls, gain in ACTIVATIONS.values()}

# Separates the stream of eval minibatches from the training one for the same (seed, step).
_EVAL_STREAM = 0xE7A1


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name][0]


#: Normalisation layers ConvNetTask can put after each convolution (parameter-only: GroupNorm
#: keeps no running statistics, so the loss stays a pure function of the parameters).
NORMS = ("group", "layer")
_NORM_LAYERS = (nn.GroupNorm, nn.LayerNorm)


def _norm_layer(kind: str, channels: int) -> nn.Module:
    """GroupNorm with 4 groups (1 when ``channels`` is not a multiple of 4) for "group"; one
    group, i.e. LayerNorm over channels and positions, for "layer" (Wu & He, 2018)."""
    groups = (4 if channels % 4 == 0 else 1) if kind == "group" else 1
    return nn.GroupNorm(groups, channels)


class _GlobalMeanPool(nn.Module):
    """(N, C, *spatial) -> (N, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).mean(-1)


class ModuleTask(Task):
    """A task whose loss is computed by a parameter-only ``nn.Sequential`` template.

    Subclasses build ``self.module`` with :meth:`_set_module` and implement ``loss``/``batch``.
    """

    module: nn.Sequential
    init_scale: float = 1.0

    def _set_module(self, build) -> None:
        with torch.device("meta"):
            self.module = build()
        if any(True for _ in self.module.buffers()):
            raise ValueError(f"{type(self).__name__}: the network must not have buffers")
        self._gains = self._layer_gains(self.module)
        self._norm_gains = {
            f"{name}.weight"
            for name, child in self.module.named_children()
            if isinstance(child, _NORM_LAYERS)
        }

    @staticmethod
    def _layer_gains(seq: nn.Sequential) -> dict[str, float]:
        """Init gain of each weight: that of the activation after its layer (past any
        normalisation layer in between), else 1."""
        children = list(seq.named_children())
        gains = {}
        for i, (name, child) in enumerate(children):
            later = [type(c) for _, c in children[i + 1 :] if not isinstance(c, _NORM_LAYERS)]
            after = later[0] if later else None
            for pname, _ in child.named_parameters():
                gains[f"{name}.{pname}"] = _GAIN_OF.get(after, 1.0)
        return gains

    def init(self, generator: torch.Generator) -> Params:
        params = {}
        for name, p in self.module.named_parameters():
            if name.endswith("bias"):
                value = torch.zeros(p.shape)
            elif name in self._norm_gains:  # a normalisation layer starts as the identity
                value = torch.ones(p.shape)
            else:
                fan_in = math.prod(p.shape[1:])
                std = self.init_scale * self._gains[name] / math.sqrt(fan_in)
                value = std * torch.randn(p.shape, generator=generator)
            params[name] = value.to(self.device, self.dtype)
        return params

    def apply(self, params: Params, x: Tensor) -> Tensor:
        """The network's output on ``x`` with parameters ``params``."""
        return functional_call(self.module, params, (x,))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())


class DatasetTask(ModuleTask):
    """A network task on one of the offline datasets (see :mod:`l2o.tasks.data`).

    Training batches are ``batch_size`` examples drawn without replacement by
    :func:`~l2o.tasks.data.batch_indices` from ``(seed, step)``. The "eval" split is the whole
    held-out set when ``eval_batch_size`` is None (the same for every seed and step), otherwise a
    held-out minibatch of that size drawn from ``(seed, step)``.
    """

    #: Whether batches carry labels: ``(x, y)`` if so, else ``(x,)``.
    uses_labels: bool = True

    def _set_data(self, dataset: str, batch_size: int, eval_batch_size: int | None) -> None:
        check_dataset_name(dataset)
        self.dataset = dataset
        self.data: Dataset = load_dataset(dataset, self.device)
        self.batch_size = positive_int("batch_size", batch_size)
        if self.batch_size > self.data.num_train:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self.data.num_train} training examples "
                f"of {dataset!r}"
            )
        if eval_batch_size is not None:
            eval_batch_size = positive_int("eval_batch_size", eval_batch_size)
            if eval_batch_size > self.data.num_eval:
                raise ValueError(
                    f"eval_batch_size={eval_batch_size} exceeds the {self.data.num_eval} eval "
                    f"examples of {dataset!r}"
                )
        self.eval_batch_size = eval_batch_size

    def _sampling(self, split: str) -> tuple[int, int, int] | None:
        """``(batch_size, examples, stream)`` of ``split``'s minibatches, or None where a batch
        is the whole eval set."""
        if split == "train":
            return self.batch_size, self.data.num_train, 0
        if self.eval_batch_size is None:
            return None
        return self.eval_batch_size, self.data.num_eval, _EVAL_STREAM

    def _indices(self, seed: int, step: int, split: str) -> Tensor | None:
        """Minibatch indices into ``split``, or None for the whole eval set."""
        sampling = self._sampling(split)
        return None if sampling is None else batch_indices(seed, step, *sampling)

    def _select(self, split: str, idx: Tensor | None) -> Batch:
        x, y = self.data.split(split)
        if idx is not None:
            idx = idx.to(x.device)
            x, y = x[idx], y[idx]
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return (x, y) if self.uses_labels else (x,)

    def batch(self, seed: int, step: int, split: str = "train") -> Batch:
        check_split(split)
        return self._select(split, self._indices(seed, step, split))

    def population_batch(self, seeds: Sequence[int], step: int, split: str = "train") -> Batch:
        """Stacked batches of ``seeds``: their indices drawn at once, one gather on the device."""
        return self._gathered(split, seeds, [step] * len(seeds), (len(seeds),))

    def population_batches(
        self, seeds: Sequence[int], first_steps: Sequence[int], num_steps: int, split: str = "train"
    ) -> Batch:
        """:meth:`Task.population_batches`, every index drawn at once and gathered at once."""
        num_steps = positive_int("num_steps", num_steps)
        row_seeds = [seed for _ in range(num_steps) for seed in seeds]
        row_steps = [first + k for k in range(num_steps) for first in first_steps]
        return self._gathered(split, row_seeds, row_steps, (num_steps, len(seeds)))

    def _gathered(
        self, split: str, seeds: Sequence[int], steps: Sequence[int], lead: tuple[int, ...]
    ) -> Batch:
        """The batches of the pairs ``zip(seeds, steps)`` (their indices from
        :func:`~l2o.tasks.data.stacked_batch_indices`: the same as :meth:`batch`'s), laid out
        with leading dims ``lead``."""
        check_split(split)
        sampling = self._sampling(split)
        if sampling is None:  # the whole eval set, shared: a view, not copies
            return tuple(t.expand(*lead, *t.shape) for t in self._select(split, None))
        idx = stacked_batch_indices(seeds, steps, *sampling)
        return self._select(split, idx.view(*lead, -1))

    def to(self, device: torch.device | str) -> DatasetTask:
        self.device = torch.device(device)
        self.data = load_dataset(self.dataset, self.device)
        return self

    def _base_config(self) -> dict:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "init_scale": self.init_scale,
        }


def _check_init_scale(init_scale: float) -> float:
    if not (init_scale >= 0.0 and math.isfinite(init_scale)):
        raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
    return float(init_scale)


class ClassifierTask(DatasetTask):
    """Mean cross-entropy of a classifier's logits; batches are ``(x, y)``."""

    def logits(self, params: Params, x: Tensor) -> Tensor:
        return self.apply(params, x)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)

    def accuracy(self, params: Params, batch: Batch) -> Tensor:
        """Fraction of ``batch`` classified correctly (not differentiable)."""
        x, y = batch
        return (self.logits(params, x).argmax(-1) == y).to(self.dtype).mean()


class LogisticRegressionTask(ClassifierTask):
    """Multinomial logistic regression (one linear layer + softmax) on ``dataset``."""

    name = "logreg"

    def __init__(
        self,
        dataset: str = "digits",
        batch_size: int = 128,
        init_scale: float = 1.0,
        eval_batch_size: int | None = None,
    ):
        self.init_scale = _check_init_scale(init_scale)
        self._set_data(dataset, batch_size, eval_batch_size)
        d, c = self.data.num_features, self.data.num_classes
        self._set_module(lambda: nn.Sequential(nn.Linear(d, c)))

    def config(self) -> dict:
        return self._base_config()


class MLPClassifierTask(ClassifierTask):
    """A fully connected classifier: ``depth`` hidden layers of ``width`` units."""

    name = "mlp"

    def __init__(
        self,
        dataset: str = "digits",
        width: int = 32,
        depth: int = 2,
        activation: str = "relu",
        batch_size: int = 128,
        init_scale: float = 1.0,
        eval_batch_size: int | None = None,
    ):
        self.width = positive_int("width", width)
        if isinstance(depth, bool) or int(depth) != depth or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
        self.depth = int(depth)
        self.activation = activation
        act = _activation(activation)
        self.init_scale = _check_init_scale(init_scale)
        self._set_data(dataset, batch_size, eval_batch_size)
        sizes = [self.data.num_features] + [self.width] * self.depth

        def build() -> nn.Sequential:
            layers: list[nn.Module] = []
            for fan_in, fan_out in itertools.pairwise(sizes):
                layers += [nn.Linear(fan_in, fan_out), act()]
            layers.append(nn.Linear(sizes[-1], self.data.num_classes))
            return nn.Sequential(*layers)

        self._set_module(build)

    def config(self) -> dict:
        return {
            **self._base_config(),
            "width": self.width,
            "depth": self.depth,
            "activation": self.activation,
        }


class ConvNetTask(ClassifierTask):
    """A small CNN: strided convolutions, global mean pooling, a linear read-out.

    2-D on digits (1x8x8 images), 1-D on MNIST-1D (1x40 signals). Each entry of ``channels`` is
    one ``kernel_size`` convolution with stride 2 and "same" padding, followed by the
    normalisation layer ``norm`` if any ("group": GroupNorm, "layer": one-group GroupNorm) and
    the activation.
    """

    name = "cnn"

    def __init__(
        self,
        dataset: str = "digits",
        channels: Sequence[int] = (8, 16),
        kernel_size: int = 3,
        activation: str = "relu",
        batch_size: int = 128,
        init_scale: float = 1.0,
        eval_batch_size: int | None = None,
        norm: str | None = None,
    ):
        if norm is not None and norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS} or None, got {norm!r}")
        self.norm = norm
        if isinstance(channels, int) or len(channels) == 0:
            raise ValueError(f"channels must be a non-empty list of positive ints: {channels!r}")
        self.channels = tuple(positive_int("channels", c) for c in channels)
        self.kernel_size = positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (for 'same' padding), got {kernel_size}")
        self.activation = activation
        act = _activation(activation)
        self.init_scale = _check_init_scale(init_scale)
        self._set_data(dataset, batch_size, eval_batch_size)
        self.example_shape = self.data.example_shape
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[len(self.example_shape)]
        k = self.kernel_size

        def build() -> nn.Sequential:
            layers: list[nn.Module] = []
            fan_in = 1
            for c in self.channels:
                layers.append(conv(fan_in, c, k, stride=2, padding=k // 2))
                if norm is not None:
                    layers.append(_norm_layer(norm, c))
                layers.append(act())
                fan_in = c
            layers += [_GlobalMeanPool(), nn.Linear(fan_in, self.data.num_classes)]
            return nn.Sequential(*layers)

        self._set_module(build)

    def logits(self, params: Params, x: Tensor) -> Tensor:
        images = x.reshape(x.shape[0], 1, *self.example_shape)
        return self.apply(params, images)

    def config(self) -> dict:
        return {
            **self._base_config(),
            "channels": list(self.channels),
            "kernel_size": self.kernel_size,
            "activation": self.activation,
            # Only when set, so the configs (and suites) of networks without one are unchanged.
            **({"norm": self.norm} if self.norm is not None else {}),
        }


class AutoencoderTask(DatasetTask):
    """An MLP autoencoder, x -> width -> bottleneck (linear) -> width -> x̂, with MSE loss.

    Batches are ``(x,)`` (labels are not used).
    """

    name = "autoencoder"
    uses_labels = False

    def __init__(
        self,
        dataset: str = "digits",
        width: int = 32,
        bottleneck: int = 8,
        activation: str = "relu",
        batch_size: int = 128,
        init_scale: float = 1.0,
        eval_batch_size: int | None = None,
    ):
        self.width = positive_int("width", width)
        self.bottleneck = positive_int("bottleneck", bottleneck)
        self.activation = activation
        act = _activation(activation)
        self.init_scale = _check_init_scale(init_scale)
        self._set_data(dataset, batch_size, eval_batch_size)
        d, w, b = self.data.num_features, self.width, self.bottleneck
        self._set_module(
            lambda: nn.Sequential(
                nn.Linear(d, w), act(), nn.Linear(w, b), nn.Linear(b, w), act(), nn.Linear(w, d)
            )
        )

    def loss(self, params: Params, batch: Batch) -> Tensor:
        (x,) = batch
        return F.mse_loss(self.apply(params, x), x)

    def config(self) -> dict:
        return {
            **self._base_config(),
            "width": self.width,
            "bottleneck": self.bottleneck,
            "activation": self.activation,
        }
