"""A character corpus that every machine already has: the Python standard library's own source.

Character-level language-model tasks need text, and l2o downloads nothing at run time. The
interpreter's standard library is always installed, so the corpus is the source of a fixed,
sorted list of well-known stdlib modules (:data:`DEFAULT_MODULES`), concatenated in that order.

Text is reduced to a 96-symbol vocabulary that does not depend on the Python version: newline
(id 0) and the 95 printable ASCII characters ``' '`` .. ``'~'`` (ids 1..95). Tabs become a
space, every other character (``\\r``, non-ASCII) is dropped.

The exact text differs between Python versions (the stdlib's source changes), so losses are
comparable only for one interpreter; for a given interpreter the whole pipeline (corpus, split,
windows) is deterministic. The first ``1 - eval_fraction`` of the characters is the training
split and the rest the evaluation split (split by position, so no window straddles both).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from l2o.tasks.data import SPLITS, check_split, seeded_generator

#: Standard-library modules whose source forms the corpus, in order. Pure-Python modules that
#: exist in every CPython from 3.10 on.
DEFAULT_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "calendar",
    "csv",
    "dataclasses",
    "difflib",
    "fractions",
    "functools",
    "heapq",
    "textwrap",
)

#: Newline first, then printable ASCII. ``VOCAB[i]`` is the character of id ``i``.
VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE: int = len(VOCAB)  # 96

_CHAR_TO_ID = {ch: i for i, ch in enumerate(VOCAB)}
# Keeps the window stream unrelated to other streams drawn from the same instance seed.
_WINDOW_SALT = 0x7E47


def encode(text: str) -> Tensor:
    """Ids (``torch.uint8``) of the characters of ``text`` that are in the vocabulary.

    Tabs are read as spaces; characters outside the vocabulary are dropped.
    """
    ids = [_CHAR_TO_ID[ch] for ch in text.replace("\t", " ") if ch in _CHAR_TO_ID]
    return torch.tensor(ids, dtype=torch.uint8)


def decode(ids: Tensor | Sequence[int]) -> str:
    """The text of a sequence of ids (inverse of :func:`encode` on vocabulary text)."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return "".join(VOCAB[int(i)] for i in values)


def module_source_path(module_name: str) -> Path:
    """Path of the ``.py`` source of a stdlib module, or a clear error if it has none."""
    module = importlib.import_module(module_name)
    try:
        path = inspect.getsourcefile(module)
    except TypeError:  # built-in module: no source file
        path = None
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"no Python source for module {module_name!r} on this interpreter; "
            f"pick pure-Python stdlib modules for the corpus (default: {DEFAULT_MODULES})"
        )
    return Path(path)


@functools.lru_cache(maxsize=8)
def _load_ids(modules: tuple[str, ...]) -> Tensor:
    parts = [module_source_path(m).read_text(encoding="utf-8") for m in modules]
    return encode("\n".join(parts))


class CharCorpus:
    """The stdlib-source corpus as ids, split by position into train and eval parts.

    ``vocab_size`` is :data:`VOCAB_SIZE` (96) for every corpus.

    Args:
        modules: stdlib module names whose source is concatenated (in the given order).
        eval_fraction: share of characters (at the end) held out as the "eval" split.
    """

    vocab_size: int = VOCAB_SIZE

    def __init__(
        self, modules: Sequence[str] = DEFAULT_MODULES, eval_fraction: float = 0.1
    ) -> None:
        if isinstance(modules, str) or len(modules) == 0:
            raise ValueError(f"modules must be a non-empty list of module names, got {modules!r}")
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        self.modules = tuple(str(m) for m in modules)
        self.eval_fraction = float(eval_fraction)
        ids = _load_ids(self.modules)  # cached: tasks sharing a corpus share its memory
        cut = round(len(ids) * (1.0 - self.eval_fraction))
        self._splits = {"train": ids[:cut], "eval": ids[cut:]}
        self.device = torch.device("cpu")

    def split(self, split: str) -> Tensor:
        """The ids of ``split`` ("train" or "eval")."""
        check_split(split)
        return self._splits[split]

    def __len__(self) -> int:
        return sum(len(v) for v in self._splits.values())

    def to(self, device: torch.device | str) -> CharCorpus:
        """Move the ids to ``device`` (in place) and return the corpus."""
        self.device = torch.device(device)
        self._splits = {k: v.to(self.device) for k, v in self._splits.items()}
        return self

    def windows(
        self, seed: int, step: int, split: str, batch_size: int, seq_len: int
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` random windows of ``split``, deterministic in ``(seed, step, split)``.

        Returns ``(inputs, targets)``, both ``int64`` of shape ``[batch_size, seq_len]``, where
        ``targets`` is ``inputs`` shifted one character ahead (next-character prediction).
        """
        ids = self.split(split)
        n_starts = len(ids) - seq_len
        if n_starts < 1:
            raise ValueError(
                f"seq_len={seq_len} is too long for the {split!r} split ({len(ids)} characters)"
            )
        generator = seeded_generator(_WINDOW_SALT, seed, step, SPLITS.index(split))
        starts = torch.randint(n_starts, (batch_size,), generator=generator).to(ids.device)
        offsets = torch.arange(seq_len + 1, device=ids.device)
        chunk = ids[starts[:, None] + offsets].long()
        return chunk[:, :-1], chunk[:, 1:]
