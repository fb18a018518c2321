"""Offline datasets for the supervised tasks, and deterministic minibatch sampling.

Nothing here touches the network: ``digits`` is scikit-learn's bundled copy of the UCI 8x8
handwritten digits, and ``mnist1d`` is *generated* by the ``mnist1d`` package
(Greydanus, 2020) with its default arguments (never its download path). Both are built
once per process (``functools.lru_cache``) and returned as float32 inputs / int64 labels with a
fixed train/eval split, so every task instance sees the same data.

Minibatches are a pure function of ``(seed, step)``: :func:`batch_indices` seeds a CPU
``torch.Generator`` from a hash of the pair, so a population of instances can be re-created
exactly (resume, evaluation, vmap-vs-loop checks). :func:`stacked_batch_indices` gives the same
indices for many pairs at once, several times faster (a truncation's batches).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DATASET_NAMES: tuple[str, ...] = ("digits", "mnist1d")
SPLITS: tuple[str, ...] = ("train", "eval")

_MASK64 = (1 << 64) - 1
# splitmix64's constants (Steele, Lea and Flood, 2014): the golden-ratio increment, then the
# finaliser's two multipliers (Stafford's "Mix13", as in Vigna's reference splitmix64);
# :func:`mix_seed` and its array form :func:`_mix_seeds` share them.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


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
    h = _GOLDEN
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + _GOLDEN) & _MASK64
        h = ((h ^ (h >> 30)) * _MIX1) & _MASK64
        h = ((h ^ (h >> 27)) * _MIX2) & _MASK64
        h ^= h >> 31
    return h >> 1


def _as_uint64(values: Sequence[int]) -> np.ndarray:
    """Integers as uint64 modulo 2**64, as :func:`mix_seed` reads them."""
    return np.array([int(v) & _MASK64 for v in values], dtype=np.uint64)


def _mix_seeds(*values: int | np.ndarray) -> np.ndarray:
    """:func:`mix_seed` over uint64 arrays (or ints), broadcast: the same hash, elementwise."""
    with np.errstate(over="ignore"):  # the hash's multiplications wrap modulo 2**64
        h = np.uint64(_GOLDEN)
        for v in values:
            h = h ^ (v if isinstance(v, np.ndarray) else np.uint64(int(v) & _MASK64))
            h = h + np.uint64(_GOLDEN)
            h = (h ^ (h >> np.uint64(30))) * np.uint64(_MIX1)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(_MIX2)
            h = h ^ (h >> np.uint64(31))
        return h >> np.uint64(1)


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


#: From this many rows on, :func:`stacked_batch_indices` draws every row's prefix at once
#: instead of calling ``torch.randperm`` per row (about 100 µs of fixed cost against 20 µs a
#: row for a 4,000-example set; measured on the 2-core CPUs of BENCHMARKS.md).
_VECTORISED_FROM_ROWS = 16

#: ``torch.randperm`` shuffles ranges this long or longer another way (64-bit draws).
_RANDPERM_32_BIT_BELOW = 0xFFFFFFFF // 20

_LOW32 = 0xFFFFFFFF
_thread_generators = threading.local()


def stacked_batch_indices(
    seeds: Sequence[int], steps: Sequence[int], batch_size: int, n: int, stream: int = 0
) -> Tensor:
    """``torch.stack`` of :func:`batch_indices` over the pairs ``zip(seeds, steps)``, bit for bit.

    Returns int64 ``[len(seeds), batch_size]`` on the CPU. For many rows (a truncation's
    minibatches, ``K`` steps times ``P`` members) it does not shuffle the whole range per row;
    see :func:`_shuffled_prefixes` for why the result is the same.
    """
    if len(seeds) != len(steps):
        raise ValueError(f"{len(seeds)} seeds but {len(steps)} steps")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    if len(seeds) < _VECTORISED_FROM_ROWS or n >= _RANDPERM_32_BIT_BELOW:
        rows = [batch_indices(s, t, batch_size, n, stream) for s, t in zip(seeds, steps)]
        return torch.stack(rows) if rows else torch.empty(0, batch_size, dtype=torch.int64)
    return _shuffled_prefixes(_mt19937_draws(seeds, steps, batch_size, stream), n)


def _mt19937_draws(seeds: Sequence[int], steps: Sequence[int], count: int, stream: int) -> Tensor:
    """The first ``count`` 32-bit outputs of each row's generator ``seeded_generator(stream,
    seed, step)``, int64 ``[rows, count]``.

    A CPU ``torch.Generator`` is an MT19937 seeded, like the reference ``init_genrand``, with
    the low 32 bits of its seed, and ``torch.randperm`` consumes one 32-bit output per swap
    (for ranges shorter than :data:`_RANDPERM_32_BIT_BELOW`).
    NumPy's legacy ``RandomState`` is the same generator with the same seeding, its stream
    frozen by NEP 19, and hands out many outputs per call (``tests/test_tasks_core.py`` checks
    the match against ``torch.randperm`` itself)."""
    state = getattr(_thread_generators, "state", None)
    if state is None:  # one per thread: seed-then-draw must not interleave
        bits = np.random.MT19937()
        state = _thread_generators.state = (np.random.RandomState(bits), bits)
    legacy, bits = state
    keys = _mix_seeds(stream, _as_uint64(seeds), _as_uint64(steps))
    out = np.empty((len(seeds), count), dtype=np.int64)
    for row, key in zip(out, (keys & _LOW32).tolist()):
        legacy.seed(key)  # the legacy init_genrand seeding of ``bits``
        row[:] = bits.random_raw(count)
    return torch.from_numpy(out)


def _shuffled_prefixes(draws: Tensor, n: int) -> Tensor:
    """The first ``B`` entries of the shuffle of ``range(n)`` that ``torch.randperm`` makes from
    each row of 32-bit ``draws`` ``[M, B]``.

    ``randperm`` on the CPU is the forward Fisher–Yates shuffle (Durstenfeld, 1964): step ``t``
    swaps position ``t`` with ``j_t = t + draw_t mod (n - t)``. A step only touches positions at
    or after its own, so the first ``B`` entries are final after ``B`` steps, and they follow
    from the ``j_t`` without replaying the swaps:

    - ``w_t``, the value at position ``t`` just before step ``t``: ``t`` itself, unless an
      earlier step ``k`` swapped position ``t`` (``j_k = t``); then it is what that step moved
      there, ``w_k`` for the last such ``k``;
    - the value step ``t`` brings to position ``t`` is the one at ``j_t``: ``w_k`` for the last
      earlier ``k`` with ``j_k = j_t``, else ``j_t`` itself.

    Both "last earlier ``k``" lookups are binary searches among the sorted keys ``(j_k, k)``,
    and the chains ``w_t = w_k`` are followed by pointer doubling: a few vectorised ops over
    ``[M, B]`` instead of ``M·B`` swaps in Python.
    """
    rows, width = draws.shape
    # int32 where the keys fit: the searches and gathers below move half the bytes.
    dtype = torch.int32 if n * width < 2**31 else torch.int64
    t = torch.arange(width, dtype=dtype)
    j = (draws % (n - t) + t).to(dtype)
    sorted_keys = (j * width + t).sort(dim=1).values  # (j_k, k), row by row

    # For each (m, t) and each of the two positions asked about, t and j_t: the last k < t of
    # row m with j_k == position, or -1. One search for both.
    position = torch.cat([t.expand(rows, width), j], dim=1)
    first_key = position * width  # the key (position, k=0)
    at = torch.searchsorted(sorted_keys, first_key + t.repeat(2)) - 1
    found = sorted_keys.gather(1, at.clamp_min(0))
    last = torch.where((at >= 0) & (found >= first_key), found - first_key, -1)
    earlier, k = last[:, :width], last[:, width:]

    # w_t = w_r for the first step r of t's chain, which found its position untouched: w_r = r.
    chain_start = torch.where(earlier >= 0, earlier, t).long()
    for _ in range((width - 1).bit_length()):  # pointer doubling; chains are shorter than B
        chain_start = chain_start.gather(1, chain_start)
    w, k = chain_start, k.long()
    return torch.where(k >= 0, w.gather(1, k.clamp_min(0)), j.long())
