"""``l2o-meta-train``: meta-train a learned optimizer from the Hydra configs in ``configs/``.

    l2o-meta-train experiment=default                 # a few minutes on CPU
    l2o-meta-train experiment=smoke                   # seconds (tests)
    l2o-meta-train estimator=tbptt task=mlp_family outer_steps=500 run_dir=runs/mlp
    l2o-meta-train run_dir=runs/mlp resume=true       # continue a killed run exactly
    torchrun --nproc_per_node=2 -m l2o.cli.meta_train experiment=default   # data parallel

The config is validated before anything is built or trained; a mistake raises
:class:`ConfigError` naming the key (``estimator.truncation=50 > estimator.horizon=20``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_NAME = "meta_train"

#: Config keys a resumed run must share with the run it continues (anything else, such as
#: ``outer_steps``, ``checkpoint_every`` or ``wandb``, may change).
RESUME_KEYS = ("seed", "lopt", "task", "estimator", "outer_optim", "meta_grad_clip", "init_from")


class ConfigError(ValueError):
    """A meta-training config that cannot work; the message names the key to fix."""


def compose_config(*overrides: str) -> DictConfig:
    """The ``l2o-meta-train`` config with Hydra ``overrides``, composed outside a Hydra run
    (scripts, tests): ``compose_config("experiment=mnist1d_mlp")``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(CONFIG_NAME, overrides=list(overrides))


# --- validation -------------------------------------------------------------------------------


_ABSENT = object()


def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_ABSENT)
    if value is _ABSENT:
        raise ConfigError(f"missing config key {key} (or its value is ???)")
    return value


def _int(cfg: DictConfig, key: str, *, low: int, optional: bool = False) -> int | None:
    value = OmegaConf.select(cfg, key, default=None) if optional else _get(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {key}={value!r}")
    if value < low:
        bound = "positive" if low == 1 else f">= {low}"
        raise ConfigError(f"{key} must be {bound}, got {key}={value}")
    return value


def _target(cfg: DictConfig, group: str, kinds: tuple[type, ...]) -> Any:
    from hydra.utils import get_object

    target = OmegaConf.select(cfg, f"{group}._target_")
    if not isinstance(target, str):
        raise ConfigError(f"{group} has no _target_; pick one of configs/{group}/*.yaml")
    try:
        obj = get_object(target)
    except Exception as err:
        raise ConfigError(f"unknown {group}: {group}._target_={target} cannot be imported") from err
    if kinds and isinstance(obj, type) and not issubclass(obj, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{group}._target_={target} is not a {names}")
    return obj


def validate_config(cfg: DictConfig) -> None:
    """Check everything that can be checked without building anything; raise ConfigError."""
    from l2o.learned.base import LOpt
    from l2o.meta.estimators import ESTIMATORS, HORIZON_SCHEDULES
    from l2o.meta.losses import META_LOSSES
    from l2o.optim import registry as optim_registry
    from l2o.tasks.base import Task, TaskFamily
    from l2o.tracking import MODES

    _int(cfg, "seed", low=0)
    _int(cfg, "outer_steps", low=1)
    _int(cfg, "checkpoint_every", low=0)
    clip = _get(cfg, "meta_grad_clip")
    if clip is not None and (
        isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0
    ):
        raise ConfigError(f"meta_grad_clip must be a number >= 0 or null, got {clip!r}")
    device = str(_get(cfg, "device"))
    if device != "auto" and device.split(":")[0] not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got device={device}")
    mode = _get(cfg, "wandb.mode")
    if mode not in MODES:
        raise ConfigError(f"wandb.mode must be one of {MODES}, got wandb.mode={mode}")
    if not isinstance(_get(cfg, "resume"), (bool, str)):
        raise ConfigError("resume must be true, false or the path of a run dir / resume file")
    init_from = OmegaConf.select(cfg, "init_from", default=None)
    if init_from is not None and not isinstance(init_from, str):
        raise ConfigError(f"init_from must be a checkpoint name or path, got {init_from!r}")

    _target(cfg, "lopt", (LOpt,))
    _target(cfg, "task", (Task, TaskFamily))
    _target(cfg, "outer_optim", ())
    optim_name = OmegaConf.select(cfg, "outer_optim.name")
    if optim_name is not None and optim_name not in optim_registry.names():
        raise ConfigError(
            f"unknown outer optimizer outer_optim.name={optim_name}; "
            f"known: {', '.join(optim_registry.names())}"
        )

    name = _get(cfg, "estimator.name")
    if name not in ESTIMATORS:
        raise ConfigError(
            f"unknown estimator estimator.name={name}; known: {', '.join(sorted(ESTIMATORS))}"
        )
    population = _int(cfg, "estimator.population", low=1)
    truncation = _int(cfg, "estimator.truncation", low=1)
    horizon = _int(cfg, "estimator.horizon", low=1)
    if truncation > horizon:
        raise ConfigError(
            f"estimator.truncation={truncation} > estimator.horizon={horizon}: a truncation "
            "cannot be longer than the episode it is cut from"
        )
    min_horizon = _int(cfg, "estimator.min_horizon", low=1, optional=True)
    if min_horizon is not None and min_horizon > horizon:
        raise ConfigError(f"estimator.min_horizon={min_horizon} > estimator.horizon={horizon}")
    if ESTIMATORS[name].antithetic and population % 2:
        raise ConfigError(
            f"estimator.population={population} must be even for {name} (antithetic pairs)"
        )
    schedule = OmegaConf.select(cfg, "estimator.horizon_schedule", default="constant")
    if schedule not in HORIZON_SCHEDULES:
        raise ConfigError(
            f"estimator.horizon_schedule must be one of {HORIZON_SCHEDULES}, got {schedule}"
        )
    for key in ("estimator.meta_loss", "eval.meta_loss"):
        if _get(cfg, key) not in META_LOSSES:
            raise ConfigError(
                f"unknown meta-loss {key}={_get(cfg, key)}; known: {sorted(META_LOSSES)}"
            )
    _int(cfg, "eval.seeds", low=0)
    _int(cfg, "eval.horizon", low=1)


# --- building ---------------------------------------------------------------------------------


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
        raise ConfigError(f"{group}: {cause}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{group}: {err}") from err


def build(cfg: DictConfig, device, world=None) -> dict[str, Any]:
    """The learned optimizer, task (family), outer rule and estimator (this rank's share)."""
    from l2o.meta.distributed import World, shard_size
    from l2o.optim.base import UpdateRule

    world = world or World()
    try:
        population = shard_size(int(cfg.estimator.population), world)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    lopt = _build("lopt", cfg.lopt)
    task = _build("task", cfg.task)
    outer_rule = _build("outer_optim", cfg.outer_optim)
    if not isinstance(outer_rule, UpdateRule):
        raise ConfigError(
            f"outer_optim builds a {type(outer_rule).__name__}, not an l2o update rule; "
            "use a config from configs/optim/"
        )
    estimator = _build(
        "estimator", cfg.estimator, lopt=lopt, task=task, device=device, population=population
    )
    return {"lopt": lopt, "task": task, "outer_rule": outer_rule, "estimator": estimator}


# --- the run ----------------------------------------------------------------------------------


def _warm_start(cfg: DictConfig, lopt) -> tuple[dict | None, str | None]:
    """Meta-parameters and id of the ``init_from`` checkpoint, whose learned optimizer must be
    the one this run trains (same architecture and config); ``(None, None)`` without one."""
    from l2o.learned.checkpoint import (
        CheckpointError,
        checkpoint_id,
        load_checkpoint,
        resolve_checkpoint,
    )

    source = OmegaConf.select(cfg, "init_from", default=None)
    if source is None:
        return None, None
    try:
        loaded, meta_params, card = load_checkpoint(resolve_checkpoint(source))
    except CheckpointError as err:
        raise ConfigError(f"init_from={source}: {err}") from err
    if type(loaded) is not type(lopt) or loaded.config() != lopt.config():
        raise ConfigError(
            f"init_from={source} holds {loaded!r}, but this run trains {lopt!r}; set lopt to "
            "the checkpoint's (see its .json card) to warm-start from it"
        )
    return meta_params, checkpoint_id(card)


def _check_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    from l2o.meta.trainer import CHECKPOINT_DIR, RESUME_FILE

    if cfg.resume is not False or not (run_dir / RESUME_FILE).exists():
        return
    if not cfg.get("overwrite", False):
        raise ConfigError(
            f"run_dir={run_dir} already holds a run ({RESUME_FILE}); pass resume=true to "
            "continue it, overwrite=true to start it over, or another run_dir"
        )
    for stale in run_dir.glob("resume*.pt"):
        stale.unlink()
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)


def _check_resumable(saved: dict, config: dict, source: str) -> None:
    """Refuse to continue a run under settings that change its trajectory."""
    from l2o.meta.trainer import ResumeError

    changed = [k for k in RESUME_KEYS if saved.get(k) != config.get(k)]
    if changed:
        raise ResumeError(
            f"{source} was written with a different {', '.join(changed)} config; exact resume "
            "needs the same settings (change only outer_steps, checkpoint_every, wandb, ...)"
        )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, meta-train, evaluate on held-out seeds; return what happened.

    Returns ``{"meta_params", "history", "skipped_nonfinite", "run_dir",
    "eval_before", "eval_after"}`` (held-out meta-losses; ``None`` with ``eval.seeds=0`` or on
    ranks > 0).
    """
    validate_config(cfg)

    import torch

    from l2o.meta.distributed import init_from_env, local_device
    from l2o.meta.trainer import (
        MetaTrainer,
        ResumeError,
        evaluate,
        load_resume_file,
        resolve_device,
        resume_file_name,
    )
    from l2o.tracking import Tracker

    try:
        device = resolve_device(cfg.device)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    world = init_from_env(device)
    device = local_device(device, world)
    parts = build(cfg, device, world)
    initial_meta_params, init_from = _warm_start(cfg, parts["lopt"])
    run_dir = Path(cfg.run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)

    resume = cfg.resume
    if resume is False:
        if world.is_main:
            _check_run_dir(cfg, run_dir)
    else:
        source = run_dir if resume is True else Path(resume)
        path = source / resume_file_name(world.rank) if source.is_dir() else source
        saved = load_resume_file(path)
        _check_resumable(saved.get("config", {}), config, str(path))
        if saved.get("step", 0) >= cfg.outer_steps:
            raise ResumeError(
                f"the run in {path.parent} already finished {saved['step']} outer steps; raise "
                f"outer_steps (now {cfg.outer_steps}) to continue it"
            )

    torch.manual_seed(cfg.seed)  # nothing should draw from it; if something does, it is seeded
    tracker = Tracker(
        config,
        project=cfg.wandb.project,
        mode=cfg.wandb.mode if world.is_main else "disabled",
        dir=run_dir,
        name=cfg.name,
    )
    with tracker:
        trainer = MetaTrainer(
            parts["lopt"],
            parts["estimator"],
            parts["outer_rule"],
            outer_steps=cfg.outer_steps,
            seed=cfg.seed,
            meta_grad_clip=cfg.meta_grad_clip or None,
            checkpoint_every=cfg.checkpoint_every,
            run_dir=run_dir,
            tracker=tracker,
            config=config,
            device=device,
            progress=bool(cfg.progress),
            world=world,
            initial_meta_params=initial_meta_params,
            init_from=init_from,
        )
        initial = dict(trainer.meta_params)
        if resume is not False:
            trainer.resume(path)
        result = trainer.train()

        before = after = None
        if world.is_main and cfg.eval.seeds > 0:
            seeds = [int(cfg.eval.first_seed) + i for i in range(cfg.eval.seeds)]
            kwargs = dict(
                seeds=seeds, horizon=cfg.eval.horizon, meta_loss=cfg.eval.meta_loss, device=device
            )
            before = evaluate(parts["lopt"], initial, parts["task"], **kwargs)
            after = evaluate(parts["lopt"], result.meta_params, parts["task"], **kwargs)
            tracker.summary({"eval_meta_loss_init": before, "eval_meta_loss_final": after})
            print(
                f"held-out meta-loss ({cfg.eval.meta_loss}, {cfg.eval.seeds} seeds, "
                f"{cfg.eval.horizon} steps): {before:.4g} at initialisation -> {after:.4g} "
                f"after {trainer.step} outer steps; checkpoint: {run_dir / 'checkpoints' / 'last'}"
            )
    return {
        "meta_params": result.meta_params,
        "history": result.history,
        "skipped_nonfinite": result.skipped_nonfinite,
        "run_dir": run_dir,
        "eval_before": before,
        "eval_after": after,
    }


def _hydra_app(cfg: DictConfig) -> None:
    from l2o.meta.trainer import ResumeError

    try:
        run(cfg)
    except (ConfigError, ResumeError) as err:
        print(f"l2o-meta-train: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point ``l2o-meta-train`` (Hydra overrides on the command line)."""
    if not (CONFIG_DIR / f"{CONFIG_NAME}.yaml").is_file():
        sys.exit(
            f"l2o-meta-train: config directory {CONFIG_DIR} (with {CONFIG_NAME}.yaml) not found; "
            "l2o-meta-train runs from a source checkout: pip install -e <the l2o repository>"
        )
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)(
        _hydra_app
    )()


if __name__ == "__main__":
    main()
