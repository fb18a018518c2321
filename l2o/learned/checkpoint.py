"""The checkpoint format of a meta-trained learned optimizer.

A checkpoint is two files side by side:

    <path>.safetensors   the meta-parameter tensors (safetensors: data only, no code) and, in
                         the file's metadata, everything that defines the optimizer's
                         behaviour: the learned optimizer's registry name and constructor
                         config and ``tensors_sha256``, a digest of the tensor data
    <path>.json          the card: the same identity, the checkpoint ``id``, the file's sha256,
                         each tensor's shape and dtype, and provenance (torch/l2o versions,
                         creation time, plus whatever the caller passes: config, step, results)

The tensors file is the unit of truth: it is written first, in one durable write
(:mod:`l2o.durable`), and it alone rebuilds the optimizer, so a kill between the two writes
leaves a loadable checkpoint (with a warning about the stale card). The identity
``id = "<lopt name>-<12 hex digits of sha256(lopt spec, tensors_sha256)>"`` covers the config
as well as the tensors: a card whose config was edited is refused, and optimizer state saved
under one id is never loaded under another.

Loading verifies everything it reads before it allocates anything large (structure, sizes and
nesting of the card; the tensor shapes the lopt's config implies, computed on fake tensors) and
rebuilds the learned optimizer only through :func:`l2o.learned.registry.get_lopt` by name:
nothing in the files is imported, instantiated from a ``_target_`` or unpickled, so a hostile
file can fail to load but cannot run code. Any problem raises :class:`CheckpointError` saying
what is wrong and what to do.

Format version 1 (cards without the embedded identity) is still read: its card must be present
and its config is trusted as written, but it is part of the id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from l2o import durable
from l2o.learned.base import LOpt
from l2o.learned.registry import get_lopt, lopt_names
from l2o.optim.base import Params
from l2o.provenance import provenance

FORMAT = "l2o-lopt"
FORMAT_VERSION = 2
TENSORS_SUFFIX = ".safetensors"
CARD_SUFFIX = ".json"
#: Card keys that save_checkpoint writes itself; ``extra_card`` may not set them.
RESERVED_KEYS = frozenset(
    {"format", "format_version", "id", "lopt", "sha256", "tensors", "tensors_sha256"}
)
#: Cards are small; anything larger is not one of ours (and is not read into memory).
MAX_CARD_BYTES = 16 * 1024 * 1024
#: Deepest nesting of lists and dicts a card (or an embedded lopt spec) may have.
MAX_CARD_DEPTH = 32
#: Largest learned optimizer a checkpoint may describe (meta-parameter elements, 4 GB float32):
#: a hostile config (``hidden_sizes=[1e6, 1e6]``) is refused before anything is allocated.
MAX_META_ELEMENTS = 1 << 30
#: Folder of the checkpoints shipped with l2o (``checkpoints/`` next to the package).
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
#: Shipped names that stand for another shipped checkpoint. ``default`` is the checkpoint
#: ``LearnedOptimizer``, ``GuardedLearnedOptimizer`` and ``l2o-eval`` use when none is named:
#: ``ortho_long_mixture`` since 2026-12-07, ``ortho_mlp`` from 2026-12-02 (each beat the one
#: before it, still shipped under its name, on ``l2o-eval suite=all``: EVALUATION.md). An alias
#: always wins over a file of its name.
SHIPPED_ALIASES: dict[str, str] = {"default": "ortho_long_mixture"}


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted, not an l2o checkpoint, or does not match its lopt."""


class StaleCardWarning(UserWarning):
    """A checkpoint's card describes other tensors than its tensors file holds (a save that was
    interrupted between the two writes); the identity embedded in the tensors file was used."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(<base>.safetensors, <base>.json)`` for ``path`` given with or without either suffix."""
    base = os.fspath(path)
    for suffix in (TENSORS_SUFFIX, CARD_SUFFIX):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return Path(base + TENSORS_SUFFIX), Path(base + CARD_SUFFIX)


# --- identity -----------------------------------------------------------------------------------


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order: the same for the
    same values whatever file (or device) they come from."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(_canonical([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _identity_digest(spec: Mapping[str, Any], tensors_sha256: str) -> str:
    return hashlib.sha256(
        _canonical({"lopt": spec, "tensors": tensors_sha256}).encode()
    ).hexdigest()


def checkpoint_id(card: Mapping[str, Any]) -> str:
    """``"<lopt name>-<12 hex digits>"`` of a digest over the lopt's name and config and the
    tensors' digest: same id, same optimizer (a card from :func:`load_checkpoint`)."""
    try:
        spec, digest = card["lopt"], card["tensors_sha256"]
        return f"{spec['name']}-{_identity_digest(spec, digest)[:12]}"
    except (KeyError, TypeError) as e:
        raise CheckpointError(
            f"not an l2o checkpoint card (no {e}); use load_checkpoint's card"
        ) from e


# --- plain JSON ---------------------------------------------------------------------------------


def non_finite_to_null(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """``obj`` with every NaN/inf float replaced by ``None``, and the paths replaced
    (``"final_metrics.meta_loss"``), so that metrics of a diverged step still go into a card."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [path or "."]
    if isinstance(obj, Mapping):
        out, paths = {}, []
        for k, v in obj.items():
            out[k], found = non_finite_to_null(v, f"{path}.{k}" if path else str(k))
            paths += found
        return out, paths
    if isinstance(obj, (list, tuple)):
        items = [non_finite_to_null(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return [v for v, _ in items], [p for _, found in items for p in found]
    return obj, []


def _depth(obj: Any) -> int:
    """Nesting depth of lists/dicts, iteratively (a hostile card must not exhaust the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if deepest > MAX_CARD_DEPTH:
                return deepest
            stack.extend(
                (v, level + 1) for v in (node.values() if isinstance(node, dict) else node)
            )
    return deepest


def _parse_json(text: bytes | str, where: str) -> Any:
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{where} it is not valid JSON ({e}): the file is truncated, corrupted or not an "
            "l2o checkpoint; copy it again or re-save the checkpoint"
        ) from e
    except RecursionError as e:
        raise CheckpointError(f"{where} it is nested too deeply to be an l2o checkpoint") from e
    if _depth(value) > MAX_CARD_DEPTH:
        raise CheckpointError(
            f"{where} it is nested more than {MAX_CARD_DEPTH} levels deep (not an l2o checkpoint)"
        )
    return value


# --- structure ----------------------------------------------------------------------------------


def _non_finite(tensors: Params) -> list[str]:
    return sorted(k for k, v in tensors.items() if not bool(torch.isfinite(v).all()))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_specs(meta_params: Params) -> dict[str, dict[str, Any]]:
    return {
        k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)}
        for k, v in sorted(meta_params.items())
    }


def expected_specs(lopt: LOpt) -> dict[str, dict[str, Any]]:
    """Names, shapes and dtypes of ``lopt.init_meta``'s tensors, computed on fake tensors (no
    memory is allocated, whatever the config asks for)."""
    with FakeTensorMode():
        fake = lopt.init_meta(torch.Generator().manual_seed(0))
    return _tensor_specs(fake)


def _check_size(specs: Mapping[str, Mapping[str, Any]], lopt: LOpt, where: str) -> None:
    elements = sum(math.prod(s["shape"]) for s in specs.values())
    if elements > MAX_META_ELEMENTS:
        raise CheckpointError(
            f"{where}: {lopt!r} would have {elements:,} meta-parameters, more than the "
            f"{MAX_META_ELEMENTS:,} an l2o checkpoint may hold; the config is corrupted or hostile"
        )


def _describe_mismatch(got: Mapping, want: Mapping, lopt: LOpt) -> str | None:
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


def _check_spec(spec: Any, where: str) -> dict[str, Any]:
    if (
        not isinstance(spec, dict)
        or not isinstance(spec.get("name"), str)
        or not isinstance(spec.get("config", {}), dict)
    ):
        raise CheckpointError(f"{where}: 'lopt' must be {{'name': str, 'config': dict}}")
    return {"name": spec["name"], "config": spec.get("config", {})}


def _lopt_from_spec(spec: Mapping[str, Any], where: str) -> LOpt:
    name, config = spec["name"], spec["config"]
    if name not in lopt_names():
        raise CheckpointError(
            f"{where} was written by learned optimizer {name!r}, which is not registered "
            f"(known: {', '.join(lopt_names())}); import the module that registers it first"
        )
    try:
        lopt = get_lopt(name, **config)
    except (TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(
            f"{where}: cannot build learned optimizer {name!r} from the config ({e}); the "
            "checkpoint was written by an incompatible l2o version or was edited"
        ) from e
    return lopt


# --- saving -------------------------------------------------------------------------------------


def _card_text(card: Mapping[str, Any]) -> str:
    try:
        return json.dumps(card, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"the checkpoint card is not plain JSON ({e}); pass only str/number/bool/None/"
            "list/dict values in extra_card (e.g. OmegaConf.to_container(cfg, resolve=True))"
        ) from e


def save_checkpoint(
    path: str | os.PathLike,
    lopt: LOpt,
    meta_params: Params,
    *,
    extra_card: dict | None = None,
) -> Path:
    """Write ``<path>.safetensors`` and then ``<path>.json`` durably; return the card's path.

    ``extra_card`` adds JSON-serialisable entries to the card (e.g. ``{"provenance": {"config":
    ..., "step": ...}, "description": ...}``); its ``provenance`` is merged over
    :func:`l2o.provenance.provenance`; NaN/inf floats in it are written as ``null`` and listed under
    ``"non_finite"``. Raises :class:`CheckpointError` if ``meta_params`` do not have the names
    and shapes ``lopt.init_meta`` produces or are not finite, or ``extra_card`` is not plain JSON.
    """
    tensors_path, card_path = checkpoint_paths(path)
    # Own copies: safetensors refuses tensors that share memory (views of one flat vector).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in meta_params.items()}
    problem = _describe_mismatch(_tensor_specs(tensors), expected_specs(lopt), lopt)
    if problem:
        raise CheckpointError(f"meta_params do not belong to {lopt!r}: {problem}")
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"meta_params {bad} hold NaN or inf; refusing to save them")
    extra, non_finite = non_finite_to_null(dict(extra_card or {}))
    clash = sorted(RESERVED_KEYS & set(extra))
    if clash:
        raise CheckpointError(f"extra_card may not set the reserved card keys {clash}")
    caller_provenance = extra.pop("provenance", {})
    if not isinstance(caller_provenance, dict):
        raise CheckpointError("extra_card['provenance'] must be a dict")

    spec = {"name": lopt.name, "config": lopt.config()}
    digest = tensors_digest(tensors)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "lopt": _canonical(spec),
        "tensors_sha256": digest,
    }
    # Everything is checked before anything is written, so a failed save leaves no half pair.
    data = safetensors.torch.save(tensors, metadata=metadata)
    card = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "id": f"{lopt.name}-{_identity_digest(spec, digest)[:12]}",
        "lopt": spec,
        "tensors_sha256": digest,
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": _tensor_specs(tensors),
        "provenance": {**provenance(), **caller_provenance},
        **extra,
    }
    if non_finite:
        card["non_finite"] = non_finite
    text = _card_text(card)
    durable.write_bytes(tensors_path, data)  # the unit of truth first
    durable.write_bytes(card_path, text.encode("utf-8"))
    return card_path


def update_card(path: str | os.PathLike, entries: Mapping[str, Any]) -> dict:
    """Add or replace non-identity entries of an existing checkpoint's card (e.g. the held-out
    results measured after saving), durably; returns the new card. The tensors file and the id
    are untouched; reserved keys are refused."""
    clash = sorted(RESERVED_KEYS & set(entries))
    if clash:
        raise CheckpointError(f"update_card may not change the reserved card keys {clash}")
    tensors_path, card, specs = _load_card_and_identity(path)
    if card.get("_stale"):  # rebuild what the stale card cannot vouch for from the tensors file
        card.update(
            sha256=_file_sha256(tensors_path),
            tensors=specs,
            id=checkpoint_id(card),
            provenance={"card_rebuilt_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )
    new, non_finite = non_finite_to_null(dict(entries))
    card = {**card, **new}
    if non_finite:
        card["non_finite"] = sorted({*card.get("non_finite", []), *non_finite})
    card.pop("_stale", None)
    durable.write_bytes(checkpoint_paths(path)[1], _card_text(card).encode("utf-8"))
    return card


# --- loading ------------------------------------------------------------------------------------


def _read_card(card_path: Path) -> dict | None:
    """The card as a dict, or None when it is missing; anything else raises."""
    if not card_path.is_file():
        return None
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise CheckpointError(f"{card_path} is too large to be an l2o checkpoint card")
    card = _parse_json(card_path.read_bytes(), f"{card_path} is not a valid checkpoint card:")
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


_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _read_header(tensors_path: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The safetensors file's metadata and tensor specs, read without loading any tensor."""
    try:
        with safetensors.safe_open(tensors_path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            specs = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                part = f.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), part.get_dtype())
                specs[k] = {"shape": list(part.get_shape()), "dtype": dtype}
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{tensors_path} is not a readable safetensors file ({e}); re-save the checkpoint"
        ) from e
    return metadata, dict(sorted(specs.items()))


def _embedded_identity(metadata: Mapping[str, str], where: str) -> tuple[dict, str] | None:
    """``(lopt spec, tensors_sha256)`` a version-2 tensors file carries, or None (version 1)."""
    if "lopt" not in metadata:
        return None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not an l2o checkpoint (format {metadata.get('format')!r})")
    spec = _check_spec(_parse_json(metadata["lopt"], f"{where}: bad metadata:"), where)
    digest = metadata.get("tensors_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CheckpointError(f"{where}: the metadata's tensors_sha256 is missing or malformed")
    return spec, digest


def _spec_difference(card_spec: Any, stored: Mapping[str, Any]) -> str:
    if not isinstance(card_spec, dict) or card_spec.get("name") != stored["name"]:
        return f"name {stored['name']!r} stored"
    config = card_spec.get("config") if isinstance(card_spec.get("config"), dict) else {}
    keys = sorted(
        k for k in {*config, *stored["config"]} if config.get(k) != stored["config"].get(k)
    )
    return ", ".join(
        f"{k}: card {config.get(k)!r}, stored {stored['config'].get(k)!r}" for k in keys
    )


def _load_card_and_identity(path: str | os.PathLike) -> tuple[Path, dict, dict]:
    """``(tensors_path, card, tensor specs of the file's header)``: the card reconciled with
    the tensors file's embedded identity (which wins when the card is stale or missing), before
    any tensor is read."""
    tensors_path, card_path = checkpoint_paths(path)
    card = _read_card(card_path)
    base = str(card_path)[: -len(CARD_SUFFIX)]
    if not tensors_path.is_file():
        what = f"the card {card_path.name} needs its tensors file beside it" if card else ""
        raise CheckpointError(
            f"no l2o checkpoint at {base!r}: {what or f'expected {card_path.name} and'} "
            f"{tensors_path.name} written by l2o.learned.save_checkpoint; copy both files together"
        )
    metadata, specs = _read_header(tensors_path)
    embedded = _embedded_identity(metadata, str(tensors_path))
    if embedded is None:  # format version 1: the card is the only record of the lopt
        if card is not None and card["format_version"] >= 2:
            raise CheckpointError(
                f"{tensors_path} carries no l2o identity metadata, but its card is of format "
                f"version {card['format_version']}: the tensors file was replaced; copy it again"
            )
        if card is None:
            raise CheckpointError(
                f"no l2o checkpoint at {base!r}: {tensors_path} exists but its card "
                f"{card_path.name} is missing; copy both files together"
            )
        card = dict(card, lopt=_check_spec(card.get("lopt"), str(card_path)))
        return tensors_path, card, specs
    spec, digest = embedded
    if card is None or card.get("tensors_sha256") != digest:
        warnings.warn(
            f"{card_path} is {'missing' if card is None else 'stale'}: it does not describe "
            f"{tensors_path.name} (a save interrupted between its two writes?); using the "
            "identity stored in the tensors file, without the card's provenance",
            StaleCardWarning,
            stacklevel=3,
        )
        card = {"format": FORMAT, "format_version": FORMAT_VERSION, "_stale": True}
    elif card.get("lopt") != spec:
        raise CheckpointError(
            f"{card_path}: the card's lopt differs from the one stored in {tensors_path.name} "
            f"({_spec_difference(card.get('lopt'), spec)}): the card was edited. A checkpoint's "
            "config is part of its identity; to change it, save a new checkpoint"
        )
    elif card.get("sha256") != _file_sha256(tensors_path):
        raise CheckpointError(
            f"{tensors_path} does not match its card's sha256: the file is truncated, corrupted "
            "or was replaced; copy it again or re-save the checkpoint"
        )
    card = dict(card, lopt=spec, tensors_sha256=digest)
    return tensors_path, card, specs


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device | None = None
) -> tuple[LOpt, Params, dict]:
    """Load ``(lopt, meta_params, card)`` written by :func:`save_checkpoint`.

    ``path`` may carry the ``.json`` or ``.safetensors`` suffix or neither. Checks, in order:
    the card parses, is small, shallow and says format "l2o-lopt"; the identity embedded in the
    tensors file agrees with the card (a stale card is reported with :class:`StaleCardWarning`,
    an edited one refused); the lopt rebuilds by registry name and its tensor shapes (computed
    without allocating) fit in the size limit and match the file's header; the tensors' digest
    matches the identity (version 1: the file's sha256 matches the card); the tensors are
    finite. ``map_location``: device for the tensors (default CPU). The returned card carries
    ``id`` (:func:`checkpoint_id`). Raises :class:`CheckpointError` on any failure.
    """
    tensors_path, card, got = _load_card_and_identity(path)
    where = str(checkpoint_paths(path)[1])
    lopt = _lopt_from_spec(card["lopt"], where)
    want = expected_specs(lopt)
    _check_size(want, lopt, where)
    problem = _describe_mismatch(got, want, lopt)
    stale = card.pop("_stale", False)
    if problem is None and not stale and card.get("tensors", got) != got:
        problem = "the card's tensor list does not describe the tensors file"
    if problem:
        raise CheckpointError(
            f"{where}: the tensors do not fit learned optimizer {lopt.name!r}: {problem}; the "
            "card and tensors come from different checkpoints or architectures"
        )

    if "tensors_sha256" not in card:  # version 1: the card's hash of the file
        digest = _file_sha256(tensors_path)
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
    digest = tensors_digest(meta_params)
    if card.setdefault("tensors_sha256", digest) != digest:
        raise CheckpointError(
            f"{tensors_path}: the tensors' digest {digest[:12]}… differs from the one recorded "
            f"({card['tensors_sha256'][:12]}…): the file is corrupted (a flipped bit, a partial "
            "copy); copy it again or re-save the checkpoint"
        )
    bad = _non_finite(meta_params)
    if bad:
        raise CheckpointError(f"{tensors_path}: non-finite values in {bad}; re-save the checkpoint")
    card["id"] = checkpoint_id(card)
    if map_location is not None:
        meta_params = {k: v.to(map_location) for k, v in meta_params.items()}
    return lopt, meta_params, card


# --- shipped checkpoints ------------------------------------------------------------------------


def _shipped_files() -> tuple[str, ...]:
    """Names of the checkpoints in ``checkpoints/`` with both files present."""
    if not SHIPPED_DIR.is_dir():
        return ()
    return tuple(
        sorted(
            p.name[: -len(CARD_SUFFIX)]
            for p in SHIPPED_DIR.glob(f"*{CARD_SUFFIX}")
            if checkpoint_paths(p)[0].is_file()
        )
    )


def shipped_checkpoints() -> tuple[str, ...]:
    """Names of the checkpoints shipped in ``checkpoints/``, aliases (``default``) included."""
    files = _shipped_files()
    aliases = {alias for alias, target in SHIPPED_ALIASES.items() if target in files}
    return tuple(sorted(set(files) | aliases))


def shipped_names_of(identity: str) -> tuple[str, ...]:
    """The shipped names whose checkpoint has id ``identity`` (each file's name, then its
    aliases), to tell a user which checkpoint an optimizer state was saved with; unreadable
    shipped cards are skipped."""
    names = []
    for name in _shipped_files():
        try:
            card = _read_card(checkpoint_paths(SHIPPED_DIR / name)[1])
            found = checkpoint_id(card) if card is not None else None
        except CheckpointError:
            continue
        if found == identity:
            names.append(name)
            names.extend(a for a, target in SHIPPED_ALIASES.items() if target == name)
    return tuple(names)


def _is_bare_name(name: str) -> bool:
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and os.sep not in name
        and not name.startswith(("~", "."))
        and not name.endswith((TENSORS_SUFFIX, CARD_SUFFIX))
    )


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A shipped checkpoint's base path for a bare name (``"ortho_mlp"`` ->
    ``checkpoints/ortho_mlp``; an alias such as ``"default"`` -> its target's), otherwise
    ``name_or_path`` itself as a path.

    Bare names (no folder, no suffix) always mean shipped checkpoints; to load a file in the
    current folder write ``./name``. Raises :class:`CheckpointError` for an unknown shipped name.
    """
    if isinstance(name_or_path, str) and _is_bare_name(name_or_path):
        name = SHIPPED_ALIASES.get(name_or_path, name_or_path)
        if name in _shipped_files():
            return SHIPPED_DIR / name
        shipped = ", ".join(shipped_checkpoints()) or "none"
        raise CheckpointError(
            f"no shipped checkpoint named {name_or_path!r} in {SHIPPED_DIR} (shipped: {shipped}); "
            f"for a file in the current folder pass './{name_or_path}'"
        )
    return Path(name_or_path)


def is_inside_shipped(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies in the shipped-checkpoint folder (which runs must never write)."""
    try:
        Path(path).resolve().relative_to(SHIPPED_DIR.resolve())
    except ValueError:
        return False
    return True


def update_schedule_of(card: Mapping[str, Any]) -> str:
    """How the checkpoint's updates are annealed over every run it trains: a
    :data:`l2o.optim.schedules.RUN_ANNEALINGS` name.

    The config's ``deploy_schedule`` when it names one (a schedule chosen for deployment, e.g.
    ``wsd``'s cool-down on a checkpoint meta-trained with constant steps), else the schedule of
    its meta-training episodes (``estimator.update_schedule``), else ``"constant"``."""
    config = card.get("config")
    config = config if isinstance(config, Mapping) else {}
    estimator = config.get("estimator")
    trained = estimator.get("update_schedule") if isinstance(estimator, Mapping) else None
    name = config.get("deploy_schedule") or trained
    return "constant" if name is None else str(name)
