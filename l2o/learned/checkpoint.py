"""The checkpoint format of a meta-trained learned optimizer.

A checkpoint is two files side by side:

    <path>.safetensors   the meta-parameter tensors (safetensors: data only, no code)
    <path>.json          the card: format "l2o-lopt", format_version, the learned optimizer's
                         registry name and constructor config, the sha256 of the safetensors file,
                         each tensor's shape and dtype, and provenance (torch/l2o versions,
                         creation time, plus whatever the caller passes: config, step, hardware)

Loading verifies everything it reads and rebuilds the learned optimizer only through
:func:`l2o.learned.registry.get_lopt` by name: nothing in the files is imported, instantiated
from a ``_target_`` or unpickled, so a hostile file can fail to load but cannot run code. Any
problem raises :class:`CheckpointError` saying what is wrong and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

import l2o
from l2o.learned.base import LOpt
from l2o.learned.registry import get_lopt, lopt_names
from l2o.optim.base import Params

FORMAT = "l2o-lopt"
FORMAT_VERSION = 1
TENSORS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
#: Card keys that save_checkpoint writes itself; ``extra_card`` may not set them.
RESERVED_KEYS = frozenset({"format", "format_version", "lopt", "sha256", "tensors"})
#: Cards are small; anything larger is not one of ours (and is not read into memory).
MAX_CARD_BYTES = 16 * 1024 * 1024
#: Folder of the checkpoints shipped with l2o (``checkpoints/`` next to the package).
SHIPPED_DIR = Path(l2o.__file__).resolve().parents[1] / "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, not an l2o checkpoint, or does not match its lopt."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<base>.safetensors, <base>.json)`` for ``path`` given with or without either suffix."""
    base = os.fspath(path)
    for suffix in (TENSORS_SUFFIX, CARD_SUFFIX):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return Path(base + TENSORS_SUFFIX), Path(base + CARD_SUFFIX)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _non_finite(tensors: Params) -> list[str]:
    return sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))


def _tensor_specs(meta_params: Params) -> dict[str, dict[str, Any]]:
    return {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
        for k, v in sorted(meta_params.items())
    }


def _expected_specs(lopt: LOpt) -> dict[str, dict[str, Any]]:
    return _tensor_specs(lopt.init_meta(torch.Generator().manual_seed(0)))


def _describe_mismatch(got: dict, want: dict, lopt: LOpt) -> str | None:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        return f"missing tensors {missing}, unexpected tensors {extra}"
    for k in sorted(want):
        if got[k]["shape"] != want[k]["shape"]:
            return (
                f"tensor {k!r} has shape {got[k]['shape']} but {lopt.name!r} with this config "
                f"expects {want[k]['shape']}"
            )
    return None


def default_provenance() -> dict[str, Any]:
    """Versions, time and machine recorded in every card (callers add config, step, ...)."""
    hardware = platform.machine() or "unknown"
    if torch.cuda.is_available():
        hardware = f"{hardware}, {torch.cuda.get_device_name()}"
    return {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
        "l2o_version": l2o.__version__,
        "python_version": platform.python_version(),
        "hardware": hardware,
    }


def save_checkpoint(
    path: str | os.PathLike,
    lopt: LOpt,
    meta_params: Params,
    *,
    extra_card: dict | None = None,
) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json``; return the card's path.

    ``extra_card`` adds JSON-serialisable entries to the card (e.g. ``{"provenance": {"config":
    ..., "step": ..., "hardware": ...}, "description": ...}``); its ``provenance`` is merged over
    :func:`default_provenance`. Raises :class:`CheckpointError` if ``meta_params`` do not have
    the names and shapes ``lopt.init_meta`` produces, or ``extra_card`` is not plain JSON.
    """
    tensors_path, card_path = checkpoint_paths(path)
    # Own copies: safetensors refuses tensors that share memory (views of one flat vector).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in meta_params.items()}
    problem = _describe_mismatch(_tensor_specs(tensors), _expected_specs(lopt), lopt)
    if problem:
        raise CheckpointError(f"meta_params do not belong to {lopt!r}: {problem}")
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"meta_params {bad} hold NaN or inf; refusing to save them")
    extra = dict(extra_card or {})
    clash = sorted(RESERVED_KEYS & set(extra))
    if clash:
        raise CheckpointError(f"extra_card may not set the reserved card keys {clash}")
    caller_provenance = extra.pop("provenance", {})
    if not isinstance(caller_provenance, dict):
        raise CheckpointError("extra_card['provenance'] must be a dict")

    # Everything is checked before anything is written, so a failed save leaves no half pair.
    data = safetensors.torch.save(tensors, metadata={"format": FORMAT})
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lopt": {"name": lopt.name, "config": lopt.config()},
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": _tensor_specs(tensors),
        "provenance": {**default_provenance(), **caller_provenance},
        **extra,
    }
    try:
        text = json.dumps(card, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"the checkpoint card is not plain JSON ({e}); pass only str/number/bool/None/"
            "list/dict values in extra_card (e.g. OmegaConf.to_container(cfg, resolve=True))"
        ) from e
    tensors_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(tensors_path, data)
    _atomic_write(card_path, text.encode("utf-8"))
    return card_path


def _read_card(card_path: Path, tensors_path: Path) -> dict:
    base = str(card_path)[: -len(CARD_SUFFIX)]
    if not card_path.is_file():
        hint = (
            f" ({tensors_path} exists but its card is missing: copy both files together)"
            if tensors_path.is_file()
            else ""
        )
        raise CheckpointError(
            f"no l2o checkpoint at {base!r}: expected {card_path.name} and {tensors_path.name} "
            f"written by l2o.learned.save_checkpoint{hint}"
        )
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise CheckpointError(f"{card_path} is too large to be an l2o checkpoint card")
    try:
        card = json.loads(card_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{card_path} is not a valid checkpoint card ({e}): the file is truncated, "
            "corrupted or not an l2o checkpoint; copy it again or re-save the checkpoint"
        ) from e
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        found = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise CheckpointError(
            f"{card_path} is not an l2o learned-optimizer checkpoint (format {found!r}, "
            f"expected {FORMAT!r}); load it with the tool that wrote it"
        )
    version = card.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{card_path}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{card_path} has format_version {version}, newer than this l2o reads "
            f"({FORMAT_VERSION}); upgrade l2o"
        )
    return card


def _lopt_from_card(card: dict, card_path: Path) -> LOpt:
    spec = card.get("lopt")
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("config", {}), dict)
    ):
        raise CheckpointError(f"{card_path}: 'lopt' must be {{'name': str, 'config': dict}}")
    name, config = spec["name"], spec.get("config", {})
    if name not in lopt_names():
        raise CheckpointError(
            f"{card_path} was written by learned optimizer {name!r}, which is not registered "
            f"(known: {', '.join(lopt_names())}); import the module that registers it first"
        )
    try:
        return get_lopt(name, **config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{card_path}: cannot build learned optimizer {name!r} from the card's config "
            f"({e}); the checkpoint was written by an incompatible l2o version"
        ) from e


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> tuple[LOpt, Params, dict]:
    """Load ``(lopt, meta_params, card)`` written by :func:`save_checkpoint`.

    ``path`` may carry the ``.json`` or ``.safetensors`` suffix or neither. Checks, in order:
    the card exists, parses and says format "l2o-lopt"; the lopt rebuilds by registry name; the
    safetensors file exists and its sha256 matches the card; its tensors have the names and
    shapes the lopt's ``init_meta`` produces and are finite. ``map_location``: device for the
    tensors (default CPU). Raises :class:`CheckpointError` on any failure.
    """
    tensors_path, card_path = checkpoint_paths(path)
    card = _read_card(card_path, tensors_path)
    lopt = _lopt_from_card(card, card_path)

    if not tensors_path.is_file():
        raise CheckpointError(
            f"{tensors_path} is missing: the card {card_path.name} needs its tensors file "
            "beside it; copy both files together"
        )
    digest = _sha256(tensors_path)
    if digest != card.get("sha256"):
        raise CheckpointError(
            f"{tensors_path} does not match its card (sha256 {digest[:12]}…, card says "
            f"{str(card.get('sha256'))[:12]}…): the file is truncated, corrupted or was "
            "replaced; copy it again or re-save the checkpoint"
        )
    try:
        meta_params = safetensors.torch.load_file(tensors_path, device="cpu")
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{tensors_path} is not a readable safetensors file ({e}); re-save the checkpoint"
        ) from e

    got = _tensor_specs(meta_params)
    problem = _describe_mismatch(got, _expected_specs(lopt), lopt)
    if problem is None and card.get("tensors") != got:
        problem = "the card's tensor list does not describe the tensors file"
    if problem:
        raise CheckpointError(
            f"{card_path}: the tensors do not fit learned optimizer {lopt.name!r}: {problem}; the "
            "card and tensors come from different checkpoints or architectures"
        )
    bad = _non_finite(meta_params)
    if bad:
        raise CheckpointError(f"{tensors_path}: non-finite values in {bad}; re-save the checkpoint")
    if map_location is not None:
        meta_params = {k: v.to(map_location) for k, v in meta_params.items()}
    return lopt, meta_params, card


def checkpoint_id(card: dict) -> str:
    """``"<lopt name>-<first 12 hex digits of the tensors' sha256>"``: same id, same optimizer."""
    try:
        return f"{card['lopt']['name']}-{card['sha256'][:12]}"
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"not an l2o checkpoint card (no {e}); use load_checkpoint's card"
        ) from e


def shipped_checkpoints() -> tuple[str, ...]:
    """Names of the checkpoints shipped in ``checkpoints/`` (both files present)."""
    if not SHIPPED_DIR.is_dir():
        return ()
    return tuple(
        sorted(
            p.name[: -len(CARD_SUFFIX)]
            for p in SHIPPED_DIR.glob(f"*{CARD_SUFFIX}")
            if checkpoint_paths(p)[0].is_file()
        )
    )


def _is_bare_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and os.sep not in name
        and not name.startswith(("~", "."))
        and not name.endswith((TENSORS_SUFFIX, CARD_SUFFIX))
    )


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's base path for a bare name (``"default"`` ->
    ``checkpoints/default``), otherwise ``name_or_path`` itself as a path.

    Bare names (no folder, no suffix) always mean shipped checkpoints; to load a file in the
    current folder write ``./name``. Raises :class:`CheckpointError` for an unknown shipped name.
    """
    if isinstance(name_or_path, str) and _is_bare_name(name_or_path):
        if name_or_path in shipped_checkpoints():
            return SHIPPED_DIR / name_or_path
        shipped = ", ".join(shipped_checkpoints()) or "none"
        raise CheckpointError(
            f"no shipped checkpoint named {name_or_path!r} in {SHIPPED_DIR} (shipped: {shipped}); "
            f"for a file in the current folder pass './{name_or_path}'"
        )
    return Path(name_or_path)
