"""The ``l2o-meta-train`` config: composing it, checking all of it before any work, building the
run's parts from it, and the config of a run being resumed.

Shared by the CLI (:mod:`l2o.cli.meta_train`), ``scripts/`` and tests, so that all of them build
exactly what ``l2o-meta-train`` builds::

    cfg = compose_config("experiment=mnist1d_mlp")
    validate_config(cfg)                        # ConfigError("estimator.truncation: ...")
    parts = build(cfg, device)                  # lopt, task, outer_rule, estimator

Every mistake raises :class:`ConfigError`, whose message has one format:
``<key>: <what is wrong> (<how to fix it>)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "meta_train"

#: Config keys a resumed run must share with the run it continues (anything else, such as
#: ``outer_steps``, ``checkpoint_every`` or ``wandb``, may change).
RESUME_KEYS = ("seed", "lopt", "task", "estimator", "outer_optim", "meta_grad_clip", "init_from")
#: Config groups whose choice (``estimator=pes``) changes the resume keys.
_GROUPS = ("lopt", "task", "estimator", "optim", "outer_optim", "experiment")
#: Keys that describe where and how a command runs, never what it trains.
_COMMAND_KEYS = ("resume", "run_dir", "overwrite")

#: Seeds up to this leave room for the per-rank offsets of a distributed run in 64 bits.
MAX_SEED = 2**62
#: Beyond these the run would exhaust memory or time long before it finished.
MAX_POPULATION = 1 << 16
MAX_INNER_STEPS = 10**7
MAX_OUTER_STEPS = 10**9
MAX_THREADS = 1024


class ConfigError(ValueError):
    """A meta-training config that cannot work; the message names the key to fix."""

    def __init__(self, key: str, what: str, fix: str | None = None) -> None:
        self.key, self.what, self.fix = key, what, fix
        super().__init__(f"{key}: {what}" + (f" ({fix})" if fix else ""))


def compose_config(*overrides: str) -> DictConfig:
    """The ``l2o-meta-train`` config with Hydra ``overrides``, composed outside a Hydra run
    (scripts, tests): ``compose_config("experiment=mnist1d_mlp")``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(CONFIG_NAME, overrides=list(overrides))


# --- checks, one per kind -----------------------------------------------------------------------

_ABSENT = object()


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT:
        raise ConfigError(key, "missing (or ???)", "set it on the command line or in a config")
    return value


def check_int(
    cfg: DictConfig, key: str, *, low: int, high: int | None = None, optional: bool = False
) -> int | None:
    value = OmegaConf.select(cfg, key, default=None) if optional else _get(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {key}={value!r}")
    if value < low:
        bound = "positive" if low == 1 else f">= {low}"
        raise ConfigError(key, f"must be {bound}, got {key}={value}")
    if high is not None and value > high:
        raise ConfigError(key, f"must be <= {high:,}, got {key}={value:,}", "a typo?")
    return value


def _one_of(cfg: DictConfig, key: str, choices: Sequence[str], what: str = "") -> str:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(
            key, f"unknown {what or key} {key}={value}", f"known: {', '.join(sorted(choices))}"
        )
    return value


def _target(cfg: DictConfig, group: str, kinds: tuple[type, ...]) -> Any:
    from hydra.utils import get_object

    key = f"{group}._target_"
    target = OmegaConf.select(cfg, key)
    if not isinstance(target, str):
        raise ConfigError(key, "missing", f"pick one of configs/{group}/*.yaml")
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(
            key, f"unknown {group}: {key}={target} cannot be imported", "check the name"
        ) from err
    if kinds and isinstance(obj, type) and not issubclass(obj, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(key, f"{key}={target} is not a {names}")
    return obj


def check_device(cfg: DictConfig) -> None:
    import torch

    device = str(_get(cfg, "device"))
    if device == "auto":
        return
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError("device", f"must be auto, cpu or cuda[:N], got device={device}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(
            "device", f"{device!r} is not a device ({err})", "auto, cpu or cuda[:N]"
        ) from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA is not available", "use device=auto or device=cpu")


def check_run_dir(cfg: DictConfig) -> None:
    from l2o.learned.checkpoint import is_inside_shipped

    value = _get(cfg, "run_dir")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError("run_dir", f"must be a folder path, got {value!r}")
    run_dir = Path(value)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run_dir", f"{run_dir} is a file", "point run_dir at a folder")
    if is_inside_shipped(run_dir / "checkpoints") or is_inside_shipped(run_dir):
        raise ConfigError(
            "run_dir",
            f"{run_dir} would write into l2o's shipped checkpoints folder",
            "use another run_dir, e.g. runs/<name>",
        )
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("run_dir", f"{existing} is not writable", "choose a folder you can write")


def validate_config(cfg: DictConfig) -> None:
    """Check everything that can be checked without building anything; raise ConfigError."""
    from l2o.learned.base import LOpt
    from l2o.meta.estimators import (
        HORIZON_SCHEDULES,
        TRUNCATION_WEIGHTINGS,
        TruncatedEstimator,
    )
    from l2o.meta.losses import META_LOSSES
    from l2o.optim.base import UpdateRule
    from l2o.optim.schedules import RUN_ANNEALINGS
    from l2o.tasks.base import Task, TaskFamily
    from l2o.tracking import MODES

    check_int(cfg, "seed", low=0, high=MAX_SEED)
    check_int(cfg, "outer_steps", low=1, high=MAX_OUTER_STEPS)
    check_int(cfg, "checkpoint_every", low=0)
    clip = _get(cfg, "meta_grad_clip")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0
    ):
        raise ConfigError("meta_grad_clip", f"must be a number >= 0 or null, got {clip!r}")
    check_device(cfg)
    threads = OmegaConf.select(cfg, "threads", default="auto")
    if threads != "auto":
        check_int(cfg, "threads", low=1, high=MAX_THREADS)
    _one_of(cfg, "wandb.mode", MODES)
    if not isinstance(_get(cfg, "resume"), (bool, str)):
        raise ConfigError("resume", "must be true, false or the path of a run dir / resume file")
    if not isinstance(OmegaConf.select(cfg, "overwrite", default=False), bool):
        raise ConfigError("overwrite", "must be true or false")
    check_run_dir(cfg)
    init_from = OmegaConf.select(cfg, "init_from", default=None)
    if init_from is not None and not isinstance(init_from, str):
        raise ConfigError("init_from", f"must be a checkpoint name or path, got {init_from!r}")

    _target(cfg, "lopt", (LOpt,))
    _target(cfg, "task", (Task, TaskFamily))
    _target(cfg, "outer_optim", (UpdateRule,))

    estimator_cls = _target(cfg, "estimator", (TruncatedEstimator,))
    name = getattr(estimator_cls, "name", "estimator")
    population = check_int(cfg, "estimator.population", low=1, high=MAX_POPULATION)
    truncation = check_int(cfg, "estimator.truncation", low=1, high=MAX_INNER_STEPS)
    horizon = check_int(cfg, "estimator.horizon", low=1, high=MAX_INNER_STEPS)
    if truncation > horizon:
        raise ConfigError(
            "estimator.truncation",
            f"estimator.truncation={truncation} > estimator.horizon={horizon}",
            "a truncation cannot be longer than the episode it is cut from",
        )
    min_horizon = check_int(cfg, "estimator.min_horizon", low=1, optional=True)
    if min_horizon is not None and min_horizon > horizon:
        raise ConfigError(
            "estimator.min_horizon",
            f"estimator.min_horizon={min_horizon} > estimator.horizon={horizon}",
        )
    if getattr(estimator_cls, "antithetic", False) and population % 2:
        raise ConfigError(
            "estimator.population",
            f"estimator.population={population} must be even for {name}",
            "antithetic pairs",
        )
    if OmegaConf.select(cfg, "estimator.horizon_schedule") is not None:
        _one_of(cfg, "estimator.horizon_schedule", HORIZON_SCHEDULES, "horizon schedule")
    if OmegaConf.select(cfg, "estimator.truncation_weighting") is not None:
        _one_of(
            cfg, "estimator.truncation_weighting", TRUNCATION_WEIGHTINGS, "truncation weighting"
        )
    for key in ("estimator.update_schedule", "deploy_schedule"):
        if OmegaConf.select(cfg, key) is not None:
            _one_of(cfg, key, RUN_ANNEALINGS, "update schedule")
    for key in ("estimator.meta_loss", "eval.meta_loss"):
        _one_of(cfg, key, list(META_LOSSES), "meta-loss")
    check_int(cfg, "eval.seeds", low=0, high=MAX_POPULATION)
    check_int(cfg, "eval.first_seed", low=0, high=MAX_SEED)
    check_int(cfg, "eval.horizon", low=1, high=MAX_INNER_STEPS)


# --- building -----------------------------------------------------------------------------------


def _build(group: str, node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(node)(**kwargs)`` with the group's name on any error.

    ``kwargs`` go in after instantiation: Hydra would turn objects (dataclass families) passed
    to ``instantiate`` into configs.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        if not kwargs:
            return instantiate(node)
        return instantiate(node, _partial_=True)(**kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError(group, str(cause)) from err
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(group, str(err)) from err


def build(cfg: DictConfig, device, world=None) -> dict[str, Any]:
    """The learned optimizer, task (family), outer rule and estimator (this rank's share)."""
    from l2o.meta.distributed import World, shard_size
    from l2o.optim.base import UpdateRule

    world = world or World()
    try:
        population = shard_size(int(cfg.estimator.population), world)
    except ValueError as err:
        raise ConfigError("estimator.population", str(err)) from err
    lopt = _build("lopt", cfg.lopt)
    task = _build("task", cfg.task)
    outer_rule = _build("outer_optim", cfg.outer_optim)
    if not isinstance(outer_rule, UpdateRule):
        raise ConfigError(
            "outer_optim",
            f"builds a {type(outer_rule).__name__}, not an l2o update rule",
            "use a config from configs/optim/",
        )
    estimator = _build(
        "estimator", cfg.estimator, lopt=lopt, task=task, device=device, population=population
    )
    return {"lopt": lopt, "task": task, "outer_rule": outer_rule, "estimator": estimator}


# --- resuming -----------------------------------------------------------------------------------


def changed_resume_keys(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """The resume keys on which ``config`` differs from the ``saved`` run's config."""
    return [k for k in RESUME_KEYS if saved.get(k) != config.get(k)]


def resumed_config(
    saved: Mapping[str, Any], cfg: DictConfig, overrides: Sequence[str] | None
) -> DictConfig:
    """The config a resumed run continues with: the run's own ``saved`` config, with the
    command line's ``overrides`` applied where they do not change the trajectory (resume,
    run_dir, outer_steps, checkpoint_every, wandb, eval, progress, ...).

    ``overrides=None`` (a config built in code) takes every non-resume key from ``cfg``. An
    override that would change a resume key raises :class:`ConfigError`.
    """
    current = OmegaConf.to_container(cfg, resolve=True)
    changed = changed_resume_keys(saved, current)
    if overrides is None:
        keys = [k for k in current if k not in RESUME_KEYS]
        touched = True
    else:
        named = override_keys(overrides)
        # Groups and resume keys are checked through the resume keys they would change.
        keys = [k for k in named if k.split(".")[0] not in (*_GROUPS, *RESUME_KEYS)]
        keys += [k for k in _COMMAND_KEYS if k not in keys]
        touched = any(k.split(".")[0] in (*changed, *_GROUPS) for k in named)
    if changed and touched:
        raise ConfigError(
            changed[0],
            f"the run being resumed was made with another {', '.join(changed)}",
            "exact resume needs the same settings; change only outer_steps, checkpoint_every, "
            "wandb, eval, progress, ...; or start a new run_dir",
        )
    merged = OmegaConf.create(dict(saved))
    for key in keys:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        OmegaConf.update(merged, key, value, force_add=True)
    return merged


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The keys (or config groups) Hydra command-line ``overrides`` set, parsed by Hydra's own
    parser (``+a.b=1`` -> ``a.b``, ``optim@outer_optim=sgd`` -> ``optim``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]
