"""Offline datasets for the supervised tasks, and deterministic minibatch sampling.

Nothing here touches the network: ``digits`` is scikit-learn's bundled copy of the UCI 8x8
handwritten digits, and ``mnist1d`` is *generated* by the ``mnist1d`` package
(Greydanus, 2020) with its default arguments (never its download path). Both are built
once per process (``functools.lru_cache``) and returned as float32 inputs / int64 labels with a
fixed train/eval split, so every task instance sees the same data.

Minibatches are a pure function of ``(seed, step)``: :func:`batch_indices` seeds a CPU
``torch.Generator`` from a hash of the pair, so a population of instances can be re-created
exactly (resume, evaluation, vmap-vs-loop checks).
"""

from __future__ import annotations

import dataclasses
import functools
import random

import numpy as np
import torch
from torch import Tensor

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist1d")
SPLITS: tuple[str, ...] = ("train", "eval")

_MASK64 = (1 << 64) - 1


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification dataset with a fixed train/eval split.

    ``x_*`` are float32 of shape ``(n, num_features)`` (examples flattened; ``example_shape``
    gives the natural shape, e.g. ``(8, 8)`` for digits or ``(40,)`` for MNIST-1D); ``y_*`` are
    int64 class labels in ``[0, num_classes)``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_eval: Tensor
    y_eval: Tensor
    num_classes: int
    example_shape: tuple[int, ...]

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_eval(self) -> int:
        return int(self.x_eval.shape[0])

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``split`` ("train" or "eval")."""
        check_split(split)
        return (self.x_train, self.y_train) if split == "train" else (self.x_eval, self.y_eval)

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor on ``device`` (the cached original is left untouched)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_eval=self.x_eval.to(device),
            y_eval=self.y_eval.to(device),
        )


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@functools.cache
def digits(num_eval: int = 297) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), standardised per pixel.

    The split is a fixed permutation (seed 0); mean and std come from the training part only
    (constant pixels keep std 1, so they stay exactly 0).
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if not 0 < num_eval < len(y):
        raise ValueError(f"num_eval must be in [1, {len(y) - 1}], got {num_eval}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held_out = order[num_eval:], order[:num_eval]
    mean = x[train].mean(0)
    std = x[train].std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x = ((x - mean) / std).float()
    return Dataset("digits", x[train], y[train], x[held_out], y[held_out], 10, (8, 8))


@functools.cache
def mnist1d(num_samples: int = 5000, length: int = 40, seed: int = 42) -> Dataset:
    """MNIST-1D generated locally: ``num_samples`` signals of ``length`` points, 10 classes.

    Uses ``mnist1d.data.make_dataset`` with the package's default arguments (80/20 split, so
    4000 train / 1000 eval by default); the package already centres and scales the signals to
    unit std. The package reseeds NumPy's and Python's global generators; their states are
    restored afterwards so building the dataset has no side effects.
    """
    if num_samples < 20:
        raise ValueError(f"num_samples must be >= 20 (two per class per split), got {num_samples}")
    if length < 4:
        raise ValueError(f"length must be >= 4, got {length}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.final_seq_length = int(length)
    args.seed = int(seed)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def as_x(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.float32).reshape(len(a), -1)

    def as_y(a: np.ndarray) -> Tensor:
        return torch.as_tensor(np.asarray(a), dtype=torch.int64)

    return Dataset(
        "mnist1d",
        as_x(data["x"]),
        as_y(data["y"]),
        as_x(data["x_test"]),
        as_y(data["y_test"]),
        10,
        (int(length),),
    )


def check_dataset_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"dataset must be one of {DATASET_NAMES}, got {name!r}")


@functools.cache
def _load_on(name: str, device: str) -> Dataset:
    data = digits() if name == "digits" else mnist1d()
    return data if device == "cpu" else data.to(device)


def load_dataset(name: str, device: torch.device | str = "cpu") -> Dataset:
    """The dataset ``name`` ("digits" or "mnist1d", default sizes) on ``device``.

    One copy per (name, device) per process, shared by every task that uses it.
    """
    check_dataset_name(name)
    return _load_on(name, str(torch.device(device)))


def mix_seed(*values: int) -> int:
    """A 63-bit seed that hashes the integers ``values`` (splitmix64 finaliser, chained).

    Different tuples give unrelated generator streams, so e.g. ``(seed, step)`` and
    ``(seed, step + 1)`` draw independent minibatches.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def seeded_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded with :func:`mix_seed` of ``values``."""
    return torch.Generator().manual_seed(mix_seed(*values))


def batch_indices(seed: int, step: int, batch_size: int, n: int, stream: int = 0) -> Tensor:
    """Indices (int64, CPU) of the minibatch of instance ``seed`` at step ``step``.

    ``batch_size`` distinct indices drawn uniformly from ``range(n)``, a pure function of
    ``(seed, step, batch_size, n, stream)``; distinct ``stream`` values (e.g. train vs eval)
    give unrelated draws for the same ``(seed, step)``.
    """
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    return torch.randperm(n, generator=seeded_generator(stream, seed, step))[:batch_size]
