"""``l2o-meta-train``: meta-train a learned optimizer from the Hydra configs in ``configs/``.

    l2o-meta-train experiment=default                 # a few minutes on CPU
    l2o-meta-train experiment=smoke                   # seconds (tests)
    l2o-meta-train estimator=tbptt task=mlp_family outer_steps=500 run_dir=runs/mlp
    l2o-meta-train run_dir=runs/mlp outer_steps=1000 resume=true   # continue a run exactly
    torchrun --nproc_per_node=2 -m l2o.cli.meta_train experiment=default   # data parallel

The whole config is validated before anything is built, written or trained; a mistake prints
one line, ``l2o-meta-train: error: <key>: <what> (<fix>)``, and exits with status 2. A resumed
run reloads its own config from its resume file, so ``resume=true run_dir=X`` alone continues
it. SIGINT/SIGTERM finish the current outer step, save, and say how to resume.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from l2o.meta.configure import (
    CONFIG_DIR,
    CONFIG_NAME,
    RESUME_KEYS,
    ConfigError,
    build,
    compose_config,
    override_keys,
    resumed_config,
    validate_config,
)

__all__ = [
    "CONFIG_DIR",
    "CONFIG_NAME",
    "RESUME_KEYS",
    "ConfigError",
    "build",
    "compose_config",
    "main",
    "run",
    "validate_config",
]

PROG = "l2o-meta-train"
LOG_FILE = "meta_train.log"
CONFIG_FILE = "config.yaml"
#: Files of a run that ``overwrite=true`` removes (checkpoints only by the names the trainer
#: writes); anything else in the run directory is left alone.
_RUN_CHECKPOINT = re.compile(r"^(step_\d{6}|last)\.(safetensors|json|md|png)$")

log = logging.getLogger("l2o.meta_train")
log.propagate = False  # to <run_dir>/meta_train.log only; the console has the progress bar


def _warm_start(cfg: DictConfig, lopt) -> tuple[dict | None, str | None]:
    """Meta-parameters and id of the ``init_from`` checkpoint, whose learned optimizer must be
    the one this run trains (same architecture and config); ``(None, None)`` without one."""
    from l2o.learned.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

    source = OmegaConf.select(cfg, "init_from", default=None)
    if source is None:
        return None, None
    try:
        loaded, meta_params, card = load_checkpoint(resolve_checkpoint(source))
    except CheckpointError as err:
        raise ConfigError("init_from", f"init_from={source}: {err}") from err
    if type(loaded) is not type(lopt) or loaded.config() != lopt.config():
        raise ConfigError(
            "init_from",
            f"init_from={source} holds {loaded!r}, but this run trains {lopt!r}",
            "set lopt to the checkpoint's (see its .json card) to warm-start from it",
        )
    return meta_params, card["id"]


def _holds_a_run(run_dir: Path) -> bool:
    return any(run_dir.glob("resume*.pt"))


def _run_files(run_dir: Path) -> list[Path]:
    """What ``overwrite=true`` removes: the resume files, the trainer's checkpoints, the config
    and log this command writes."""
    from l2o.meta.trainer import CHECKPOINT_DIR

    files = [*run_dir.glob("resume*.pt"), run_dir / CONFIG_FILE, run_dir / LOG_FILE]
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir():
        files += [p for p in checkpoints.iterdir() if _RUN_CHECKPOINT.match(p.name)]
    return [p for p in files if p.is_file()]


def _check_fresh_run_dir(cfg: DictConfig, run_dir: Path) -> None:
    if _holds_a_run(run_dir) and not cfg.overwrite:
        raise ConfigError(
            "run_dir",
            f"run_dir={run_dir} already holds a run (resume.pt)",
            "pass resume=true to continue it, overwrite=true to start it over, or another run_dir",
        )


def _clear_run(run_dir: Path) -> None:
    removed = _run_files(run_dir)
    for path in removed:
        path.unlink()
    if removed:
        print(f"{PROG}: overwrite=true: removed {len(removed)} files of the old run in {run_dir}")


def _saved_run(source: Path, rank: int) -> tuple[dict, Path]:
    """The state of the newest readable resume file of ``source`` (a run dir or a file)."""
    from l2o.meta.resume import load_resume_file, no_readable_save, readable_steps

    if source.is_file():
        return load_resume_file(source), source
    steps = readable_steps(source, rank)
    if not steps:
        raise no_readable_save(source, rank)
    path = steps[max(steps)]
    return load_resume_file(path), path


def _set_threads(cfg: DictConfig) -> None:
    import torch

    threads = OmegaConf.select(cfg, "threads", default="auto")
    if threads != "auto":
        torch.set_num_threads(int(threads))


def _start_log(run_dir: Path, is_main: bool) -> logging.Handler | None:
    if not is_main:
        return None
    from l2o.cli import log_to_file

    return log_to_file(log, run_dir / LOG_FILE)


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate ``cfg``, meta-train, evaluate on held-out seeds; return what happened.

    ``overrides``: the command line's Hydra overrides; with ``resume``, they are applied to the
    run's own saved config (``None``: ``cfg`` itself says what to change, see
    :func:`l2o.meta.configure.resumed_config`).

    Returns ``{"meta_params", "history", "skipped_nonfinite", "run_dir",
    "eval_before", "eval_after"}`` (held-out meta-losses; ``None`` with ``eval.seeds=0`` or on
    ranks > 0).
    """
    from l2o.meta.resume import ResumeError

    validate_config(cfg)
    rank = int(os.environ.get("RANK", "0"))
    resume = cfg.resume
    run_dir = Path(cfg.run_dir)
    path = None
    if resume is False:
        _check_fresh_run_dir(cfg, run_dir)
    else:
        source = run_dir if resume is True else Path(resume)
        saved, path = _saved_run(source, rank)
        folder = source if source.is_dir() else source.parent
        if resume is not True and not _names(overrides, "run_dir"):
            run_dir = folder  # resume=<path> alone continues that run where it is
            cfg = OmegaConf.merge(cfg, {"run_dir": str(folder)})
        cfg = resumed_config(saved.get("config", {}), cfg, overrides)
        validate_config(cfg)
        if saved.get("step", 0) >= cfg.outer_steps:
            raise ResumeError(
                f"the run in {path.parent} already finished {saved['step']} outer steps; raise "
                f"outer_steps (now {cfg.outer_steps}) to continue it"
            )
        if folder.resolve() != run_dir.resolve():
            # A new run branching off another's save: its run_dir must not hold a third run,
            # and it gets a W&B run of its own.
            _check_fresh_run_dir(cfg, run_dir)
            saved = {**saved, "tracker_run_id": None}
        if source.is_dir():
            path = source  # the trainer picks the newest step saved completely on every rank
    return _train(cfg, run_dir, path, saved if resume is not False else None)


def _names(overrides: Sequence[str] | None, key: str) -> bool:
    """Whether the command line's ``overrides`` set ``key`` (``None``: the config is explicit)."""
    return overrides is None or key in override_keys(overrides)


def _train(cfg: DictConfig, run_dir: Path, resume_path: Path | None, saved) -> dict[str, Any]:
    import torch

    from l2o import durable
    from l2o.meta.distributed import init_from_env, local_device
    from l2o.meta.report import write_report
    from l2o.meta.trainer import CHECKPOINT_DIR, MetaTrainer, resolve_device
    from l2o.tracking import Tracker

    _set_threads(cfg)
    device = resolve_device(cfg.device)
    parts = build(cfg, device)  # fails before any process group or file exists
    world = init_from_env(device)
    device = local_device(device, world)
    if world.distributed:
        parts = build(cfg, device, world)
    initial_meta_params, init_from = _warm_start(cfg, parts["lopt"])
    if saved is None and world.is_main and cfg.overwrite:
        _clear_run(run_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    handler = _start_log(run_dir, world.is_main)
    if world.is_main:
        durable.write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg).encode("utf-8"))
        log.info(
            "%s run_dir=%s device=%s threads=%d world=%d",
            "resume" if saved else "start",
            run_dir,
            device,
            torch.get_num_threads(),
            world.size,
        )

    torch.manual_seed(cfg.seed)  # nothing should draw from it; if something does, it is seeded
    tracker = Tracker(
        config,
        project=cfg.wandb.project,
        mode=cfg.wandb.mode if world.is_main else "disabled",
        dir=run_dir,
        name=cfg.name,
        run_id=(saved or {}).get("tracker_run_id"),
    )
    try:
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
            if saved is not None:
                trainer.resume(resume_path)
                log.info("resumed at outer step %d", trainer.step)
            result = trainer.train()
            log.info(
                "trained to outer step %d (%d skipped as non-finite) in %.1f s",
                trainer.step,
                trainer.skipped_nonfinite,
                trainer.wall_time,
            )
            before = after = None
            last = run_dir / CHECKPOINT_DIR / "last"
            if world.is_main and cfg.eval.seeds > 0:
                before, after = _evaluate(cfg, parts, initial, result.meta_params, device)
                tracker.summary({"eval_meta_loss_init": before, "eval_meta_loss_final": after})
            if world.is_main:
                evaluation = None
                if before is not None:
                    evaluation = {
                        "meta_loss": cfg.eval.meta_loss,
                        "seeds": int(cfg.eval.seeds),
                        "first_seed": int(cfg.eval.first_seed),
                        "horizon": int(cfg.eval.horizon),
                        "before": before,
                        "after": after,
                    }
                write_report(last, result.history, evaluation)
                log.info("held-out meta-loss %s -> %s; report %s.md", before, after, last)
                summary = f"checkpoint: {last}"
                if before is not None:
                    summary = (
                        f"held-out meta-loss ({cfg.eval.meta_loss}, {cfg.eval.seeds} seeds, "
                        f"{cfg.eval.horizon} steps): {before:.4g} at initialisation -> "
                        f"{after:.4g} after {trainer.step} outer steps; {summary}"
                    )
                print(summary)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
    return {
        "meta_params": result.meta_params,
        "history": result.history,
        "skipped_nonfinite": result.skipped_nonfinite,
        "run_dir": run_dir,
        "eval_before": before,
        "eval_after": after,
    }


def _evaluate(cfg: DictConfig, parts, initial, final, device) -> tuple[float, float]:
    from l2o.eval.episodes import evaluate

    seeds = [int(cfg.eval.first_seed) + i for i in range(cfg.eval.seeds)]
    kwargs = dict(
        seeds=seeds,
        horizon=cfg.eval.horizon,
        meta_loss=cfg.eval.meta_loss,
        device=device,
        # Held-out episodes anneal over their length as the meta-training episodes did.
        update_schedule=getattr(parts["estimator"], "update_schedule", "constant"),
    )
    show = bool(cfg.progress)
    if show:
        print(
            f"held-out evaluation: {len(seeds)} seeds x {cfg.eval.horizon} inner steps, at "
            "initialisation and after meta-training",
            flush=True,
        )
    before = evaluate(parts["lopt"], initial, parts["task"], progress=show and "before", **kwargs)
    after = evaluate(parts["lopt"], final, parts["task"], progress=show and "after", **kwargs)
    return before, after


def _error(message: str, code: int = 2) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # one message, not one per rank
        print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _hydra_app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from l2o.meta.resume import ResumeError
    from l2o.meta.trainer import MetaTrainingInterrupted

    overrides = list(HydraConfig.get().overrides.task)
    try:
        run(cfg, overrides)
    except (ConfigError, ResumeError) as err:
        _error(str(err))
    except MetaTrainingInterrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"{PROG}: {stop}. Resume with: {PROG} run_dir={stop.run_dir} resume=true",
                file=sys.stderr,
            )
        sys.exit(128 + stop.signum)


def _precheck(args: Sequence[str]) -> None:
    """Compose the config once before Hydra runs, so that an unknown group choice or a bad
    override is one line (and Hydra creates nothing for a command that cannot run)."""
    if any(a.startswith("-") for a in args):  # --help, --cfg, -m, ...: Hydra's business
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose_config(*args)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        key = next((a.split("=")[0] for a in args if a.split("=")[0] in first), "overrides")
        _error(f"{key}: {first} (see configs/ for the choices)")


def main() -> None:
    """Console entry point ``l2o-meta-train`` (Hydra overrides on the command line)."""
    if not (CONFIG_DIR / f"{CONFIG_NAME}.yaml").is_file():
        sys.exit(
            f"{PROG}: config directory {CONFIG_DIR} (with {CONFIG_NAME}.yaml) not found; "
            f"{PROG} runs from a source checkout: pip install -e <the l2o repository>"
        )
    _precheck(sys.argv[1:])
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)(
        _hydra_app
    )()


if __name__ == "__main__":
    main()
