"""``l2o-eval``: learned optimizers against tuned hand-designed ones, suites x optimizers x seeds.

    l2o-eval                                   # the default checkpoint on in_distribution
    l2o-eval suite=all                         # every suite
    l2o-eval suite=[horizon_x10,real_models] checkpoints=[default,runs/mlp/checkpoints/last]
    l2o-eval baselines=[sgd,momentum] 'external=[{target: torch.optim.AdamW}]'

Config: ``configs/eval/default.yaml``. Every name (suite, optimizer, dotted path, checkpoint) and
value is checked before any work; a mistake prints ``l2o-eval: error: <key>: <what> (<fix>)``
and exits with status 2. Outputs go to ``run_dir``: ``results.json``, ``results.csv``,
``summary.md``, PNG plots, ``config.yaml``, ``eval.log``, and ``cells/`` (finished work, reused
when the command runs again, e.g. after an interruption).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from l2o.meta.configure import (
    CONFIG_DIR,
    MAX_THREADS,
    ConfigError,
    check_device,
    check_int,
    check_run_dir,
)

__all__ = ["CONFIG_NAME", "build_plan", "compose_eval_config", "main", "run", "validate"]

PROG = "l2o-eval"
CONFIG_NAME = "eval/default"
CONFIG_FILE = "config.yaml"
LOG_FILE = "eval.log"
#: Config keys that decide the results; a run_dir evaluated under other values needs overwrite.
RESULT_KEYS = (
    "suite",
    "checkpoints",
    "guard",
    "reference",
    "baselines",
    "external",
    "family",
    "horizon",
    "n_tasks",
    "n_seeds",
    "loss_scales",
    "suite_settings",
    "tuning",
    "metrics",
    "bootstrap",
)
MAX_SEEDS_PER_TASK = 4096
#: What ``suite_settings.<suite>`` may set: suite sizes and the suite's own tuning.
SUITE_KEYS = ("n_tasks", "n_seeds", "tuning_seeds", "grid")
MAX_HORIZON = 10**7

log = logging.getLogger("l2o.eval")
log.propagate = False


def compose_eval_config(*overrides: str) -> DictConfig:
    """The ``l2o-eval`` config with Hydra ``overrides``, outside a Hydra run (tests, scripts)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        return compose(CONFIG_NAME, overrides=list(overrides))


# --- validation ---------------------------------------------------------------------------------


def _names(cfg: DictConfig, key: str) -> list:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return []
    if isinstance(value, (str, DictConfig)):
        return [value]
    if isinstance(value, ListConfig):
        return list(value)
    raise ConfigError(key, f"must be a name or a list, got {value!r}")


def _suite_names(cfg: DictConfig) -> list[str]:
    from l2o.tasks.suites import suite_names

    known = suite_names()
    chosen = _names(cfg, "suite")
    if chosen == ["all"]:
        others = [n for n in known if n not in ("in_distribution", "real_models")]
        return ["in_distribution", *others, "real_models"]
    for name in chosen:
        if name not in known:
            from l2o.registry import did_you_mean

            raise ConfigError(
                "suite",
                f"unknown suite {name!r}{did_you_mean(name, known)}",
                f"known: {', '.join(known)}, or all",
            )
    if not chosen:
        raise ConfigError("suite", "no suite chosen", "suite=in_distribution, a list, or all")
    return list(dict.fromkeys(chosen))


def _number(cfg: DictConfig, key: str, *, low: float, high: float | None = None) -> float:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, f"must be a number, got {key}={value!r}")
    if value <= low or (high is not None and value >= high):
        span = f"> {low}" + (f" and < {high}" if high is not None else "")
        raise ConfigError(key, f"must be {span}, got {key}={value}")
    return float(value)


def _grid(cfg: DictConfig, key: str) -> None:
    grid = OmegaConf.select(cfg, key)
    if not isinstance(grid, ListConfig) or not len(grid):
        raise ConfigError(key, "must be a non-empty list of learning rates")
    for i in range(len(grid)):
        _number(cfg, f"{key}.{i}", low=0.0)


def validate(cfg: DictConfig) -> None:
    """Check every value that needs nothing built; raise ConfigError."""
    _suite_names(cfg)
    check_int(cfg, "n_tasks", low=1, high=1000)
    check_int(cfg, "n_seeds", low=1, high=MAX_SEEDS_PER_TASK)
    settings = OmegaConf.select(cfg, "suite_settings") or {}
    if not isinstance(settings, DictConfig):
        raise ConfigError("suite_settings", "must be a mapping suite -> {n_tasks, n_seeds}")
    from l2o.tasks.suites import suite_names

    for suite, values in settings.items():
        if suite not in suite_names():
            raise ConfigError(f"suite_settings.{suite}", f"unknown suite {suite!r}")
        for key in values:
            where = f"suite_settings.{suite}.{key}"
            if key not in SUITE_KEYS:
                raise ConfigError(where, f"unknown key {key!r}", f"known: {', '.join(SUITE_KEYS)}")
            if key == "grid":
                _grid(cfg, where)
            else:
                check_int(cfg, where, low=1, high=MAX_SEEDS_PER_TASK)
    horizon = OmegaConf.select(cfg, "horizon")
    if horizon != "checkpoint":
        check_int(cfg, "horizon", low=1, high=MAX_HORIZON)
    scales = _names(cfg, "loss_scales") if OmegaConf.select(cfg, "loss_scales") else []
    if not scales:
        raise ConfigError("loss_scales", "must be a non-empty list of positive numbers")
    for i in range(len(scales)):
        _number(cfg, f"loss_scales.{i}", low=0.0)
    _grid(cfg, "tuning.grid")
    check_int(cfg, "tuning.seeds", low=1, high=MAX_SEEDS_PER_TASK)
    check_int(cfg, "metrics.window", low=1, high=MAX_HORIZON)
    _number(cfg, "metrics.divergence_factor", low=0.0)
    _number(cfg, "bootstrap.confidence", low=0.0, high=1.0)
    check_int(cfg, "bootstrap.resamples", low=1, high=10**6)
    check_int(cfg, "bootstrap.seed", low=0, high=2**32 - 1)
    check_int(cfg, "guard.compare_every", low=1, high=MAX_HORIZON)
    for key in ("guard.unguarded", "guard.guarded", "guard.shadow", "guard.deferred"):
        if not isinstance(OmegaConf.select(cfg, key), bool):
            raise ConfigError(key, f"expected true or false, got {OmegaConf.select(cfg, key)!r}")
    if OmegaConf.select(cfg, "threads") != "auto":
        check_int(cfg, "threads", low=1, high=MAX_THREADS)
    check_device(cfg)
    check_run_dir(cfg)
    if (
        not _names(cfg, "checkpoints")
        and not _names(cfg, "baselines")
        and not _names(cfg, "external")
    ):
        raise ConfigError(
            "checkpoints", "nothing to evaluate against the reference", "name a checkpoint"
        )


# --- building the plan --------------------------------------------------------------------------


def _container(node: Any) -> dict:
    """A config mapping as a plain dict (``{}`` for none)."""
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return dict(node)
    raise ConfigError("config", f"expected a mapping, got {node!r}")


CHECKPOINT_KEYS = "{checkpoint, update_schedule, ns_dtype}"


def _checkpoint_item(item: Any, key: str) -> tuple[str, str | None, str | None]:
    """A checkpoint name or path, or ``{checkpoint: <name or path>, update_schedule: cosine,
    ns_dtype: bfloat16}`` (both optional): the checkpoint, its schedule and NS dtype overrides."""
    if isinstance(item, DictConfig):
        extra = set(item) - {"checkpoint", "update_schedule", "ns_dtype"}
        if extra:
            raise ConfigError(key, f"unknown keys {sorted(extra)}", f"use {CHECKPOINT_KEYS}")
        if "checkpoint" not in item:
            raise ConfigError(key, "names no checkpoint", f"use {CHECKPOINT_KEYS}")
        schedule, ns_dtype = item.get("update_schedule"), item.get("ns_dtype")
        return (
            str(item.checkpoint),
            None if schedule is None else str(schedule),
            None if ns_dtype is None else str(ns_dtype),
        )
    return str(item), None, None


def _baseline(item: Any, key: str):
    from l2o.eval.contenders import rule_contender

    if isinstance(item, str):
        return rule_contender(item)
    if isinstance(item, DictConfig) and "name" in item:
        extra = set(item) - {"name", "hparams", "update_schedule"}
        if extra:
            raise ConfigError(
                key, f"unknown keys {sorted(extra)}", "use {name, hparams, update_schedule}"
            )
        hparams = _container(item.get("hparams"))
        return rule_contender(item.name, hparams, str(item.get("update_schedule", "constant")))
    raise ConfigError(key, f"must be a registered name or {{name, hparams}}, got {item!r}")


def _external(item: Any, key: str):
    from l2o.eval.contenders import torch_contender

    if not isinstance(item, DictConfig) or "target" not in item:
        raise ConfigError(key, f"must be {{target: <dotted path>, kwargs: {{...}}}}, got {item!r}")
    extra = set(item) - {"target", "kwargs", "name", "tune_lr"}
    if extra:
        raise ConfigError(key, f"unknown keys {sorted(extra)}", "use target, kwargs, name, tune_lr")
    kwargs = _container(item.get("kwargs"))
    return torch_contender(
        item.target, kwargs, name=item.get("name"), tune_lr=bool(item.get("tune_lr", True))
    )


def _vmappable(contender, key: str):
    """The reference and the guard's fallback run inside the vmapped unroll."""
    from l2o.eval.contenders import RuleContender

    if not isinstance(contender, RuleContender):
        raise ConfigError(key, f"{contender.name} cannot run under vmap", "choose another rule")
    return contender


def _contenders(cfg: DictConfig):
    from l2o.eval.contenders import ContenderError, learned_contenders, rule_contender

    current = "reference"
    try:
        reference = _vmappable(rule_contender(cfg.reference), "reference")
        current = "guard.fallback"
        fallback = rule_contender(cfg.guard.fallback, _container(cfg.guard.get("fallback_hparams")))
        fallback = _vmappable(fallback, current)
        out = []
        for i, item in enumerate(_names(cfg, "checkpoints")):
            current = f"checkpoints.{i}"
            checkpoint, schedule, ns_dtype = _checkpoint_item(item, current)
            out += learned_contenders(
                checkpoint,
                guarded=bool(cfg.guard.guarded),
                unguarded=bool(cfg.guard.unguarded),
                fallback=fallback,
                compare_every=int(cfg.guard.compare_every),
                shadow=cfg.guard.shadow,
                deferred=cfg.guard.deferred,
                update_schedule=schedule,
                ns_dtype=ns_dtype,
            )
        for i, item in enumerate(_names(cfg, "baselines")):
            current = f"baselines.{i}"
            out.append(_baseline(item, current))
        for i, item in enumerate(_names(cfg, "external")):
            current = f"external.{i}"
            out.append(_external(item, current))
    except ContenderError as err:
        raise ConfigError(current, str(err)) from None
    names = [c.name for c in [reference, *out]]
    duplicates = sorted({n for n in names if names.count(n) > 1} - {reference.name})
    if duplicates:
        raise ConfigError("checkpoints", f"two optimizers are both named {duplicates[0]!r}")
    return reference, out


def _family_and_horizon(cfg: DictConfig, contenders) -> tuple[Any, int, str]:
    """The meta-training family and horizon the suites are built from, and where from."""
    from hydra.utils import instantiate

    from l2o.eval.contenders import GuardedContender, LearnedContender
    from l2o.tasks.base import TaskFamily
    from l2o.tasks.suites import default_family

    # The first checkpoint's card, whether it is evaluated alone or only under the guard.
    learned = (c.learned if isinstance(c, GuardedContender) else c for c in contenders)
    card = next((c.card for c in learned if isinstance(c, LearnedContender)), {})
    trained = (card.get("config") or {}) if isinstance(card, dict) else {}
    family, source = None, "the default MLPFamily"
    if cfg.family == "checkpoint":
        task_config = trained.get("task")
        if isinstance(task_config, dict) and "_target_" in task_config:
            try:
                built = instantiate(task_config)
            except Exception:  # an old or foreign card: fall back to the default family
                built = None
            if isinstance(built, TaskFamily):
                family, source = built, f"the meta-training family of {card.get('id')}"
        family = family or default_family()
    elif isinstance(cfg.family, str):  # a task-family config of configs/task/
        path = CONFIG_DIR / "task" / f"{cfg.family}.yaml"
        known = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*_family.yaml"))
        if not path.is_file():
            raise ConfigError(
                "family", f"no task-family config {cfg.family!r}", f"checkpoint, {', '.join(known)}"
            )
        family = instantiate(OmegaConf.load(path))
        if not isinstance(family, TaskFamily):
            raise ConfigError(
                "family", f"{cfg.family!r} is a task, not a task family", ", ".join(known)
            )
        source = f"configs/task/{cfg.family}.yaml"
    else:
        from l2o.tasks.families import get_family

        spec = _container(cfg.family)
        if "name" not in spec:
            raise ConfigError("family", "must be checkpoint, a configs/task family or {name: ...}")
        try:
            family, source = get_family(**spec), "the family config"
        except (TypeError, ValueError) as err:
            raise ConfigError("family", str(err)) from None
    if cfg.horizon == "checkpoint":
        from l2o.meta.estimators import median_episode_length

        estimator = trained.get("estimator")
        estimator = estimator if isinstance(estimator, dict) else {}
        horizon = median_episode_length(estimator) or 100
    else:
        horizon = int(cfg.horizon)
    return family, int(horizon), source


def build_plan(cfg: DictConfig) -> dict[str, Any]:
    """Everything ``l2o-eval`` will run, resolved and checked: suites, contenders, settings."""
    from l2o.eval.evaluation import Settings
    from l2o.tasks.suites import get_suite

    validate(cfg)
    reference, contenders = _contenders(cfg)
    family, horizon, source = _family_and_horizon(cfg, contenders)
    suites, own_settings = [], {}
    for name in _suite_names(cfg):
        sizes = {"n_tasks": int(cfg.n_tasks), "n_seeds": int(cfg.n_seeds)}
        own = _container(cfg.suite_settings.get(name))
        tuning = {k: own.pop(k) for k in ("tuning_seeds", "grid") if k in own}
        sizes.update(own)
        if tuning:
            own_settings[name] = tuning
        try:
            suites.append(
                get_suite(
                    name,
                    family=family,
                    horizon=horizon,
                    loss_scales=list(cfg.loss_scales),
                    **sizes,
                )
            )
        except ValueError as err:
            raise ConfigError("suite", f"suite {name!r}: {err}") from None
    from l2o.meta.distributed import resolve_device

    settings = Settings(
        grid=tuple(float(v) for v in cfg.tuning.grid),
        tuning_seeds=int(cfg.tuning.seeds),
        window=int(cfg.metrics.window),
        divergence_factor=float(cfg.metrics.divergence_factor),
        confidence=float(cfg.bootstrap.confidence),
        resamples=int(cfg.bootstrap.resamples),
        bootstrap_seed=int(cfg.bootstrap.seed),
        device=str(resolve_device(cfg.device)),
    )
    suite_settings = {
        name: dataclasses.replace(
            settings,
            grid=tuple(float(v) for v in tuning.get("grid", settings.grid)),
            tuning_seeds=int(tuning.get("tuning_seeds", settings.tuning_seeds)),
        )
        for name, tuning in own_settings.items()
    }
    return {
        "suites": suites,
        "suite_settings": suite_settings,
        "reference": reference,
        "contenders": contenders,
        "settings": settings,
        "family": family,
        "family_source": source,
        "horizon": horizon,
    }


# --- running ------------------------------------------------------------------------------------


def _result_config(cfg: DictConfig) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: container.get(k) for k in RESULT_KEYS}


def _with_new_defaults(saved: dict) -> dict:
    """``saved`` (a run_dir's result config) with the scalar settings that sections such as
    ``guard`` gained since it was written filled in at their defaults: such a run had the
    behaviour the default keeps (``guard.deferred: false`` before deferred guards existed), so
    continuing it is no change of settings."""
    # The file itself, not compose_eval_config: this runs inside the Hydra app, which refuses
    # a second initialisation.
    defaults = _result_config(OmegaConf.load(CONFIG_DIR / f"{CONFIG_NAME}.yaml"))
    filled = dict(saved)
    for key, section in defaults.items():
        if isinstance(section, dict) and isinstance(saved.get(key), dict):
            missing = {
                k: v
                for k, v in section.items()
                if k not in saved[key] and not isinstance(v, (dict, list))
            }
            filled[key] = {**saved[key], **missing}
    return filled


def _check_run_dir_config(cfg: DictConfig, run_dir: Path) -> None:
    saved = run_dir / CONFIG_FILE
    if not saved.is_file() or cfg.overwrite:
        return
    try:
        previous = OmegaConf.load(saved)
    except Exception:  # unreadable: treat as another evaluation's
        previous = OmegaConf.create({})
    before, now = _with_new_defaults(_result_config(previous)), _result_config(cfg)
    if before != now:
        changed = [k for k in RESULT_KEYS if before[k] != now[k]]
        raise ConfigError(
            "run_dir",
            f"{run_dir} holds an evaluation with other settings ({', '.join(changed)})",
            "pass overwrite=true to replace its tables (finished cells are kept and reused), "
            "or choose another run_dir",
        )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``cfg``, evaluate, write the outputs; returns the results dict."""
    import torch

    from l2o import durable
    from l2o.eval.cells import CellStore
    from l2o.eval.evaluation import count_cells, evaluate_suites
    from l2o.eval.report import write_outputs
    from l2o.provenance import provenance
    from l2o.tracking import Tracker

    plan = build_plan(cfg)
    run_dir = Path(cfg.run_dir)
    _check_run_dir_config(cfg, run_dir)
    if cfg.threads != "auto":
        torch.set_num_threads(int(cfg.threads))
    from l2o.cli import log_to_file

    handler = log_to_file(log, run_dir / LOG_FILE)
    try:
        durable.write_bytes(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg).encode("utf-8"))
        settings = plan["settings"]
        suites, contenders, reference = plan["suites"], plan["contenders"], plan["reference"]
        total = count_cells(suites, contenders, reference)
        log.info(
            "start: %d suites, %d optimizers, %d cells, device=%s, family: %s, horizon %d",
            len(suites),
            len(contenders) + 1,
            total,
            settings.device,
            plan["family_source"],
            plan["horizon"],
        )
        store = CellStore(run_dir / "cells")
        config = OmegaConf.to_container(cfg, resolve=True)
        start = time.perf_counter()
        with Tracker(
            config, project=cfg.wandb.project, mode=cfg.wandb.mode, dir=run_dir, name="l2o-eval"
        ) as tracker:
            bar = None
            if cfg.progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, desc=PROG, unit="cell")

            def on_cell(label: str) -> None:
                log.info("done %s", label)
                if bar is not None:
                    bar.set_postfix_str(label[-60:], refresh=False)
                    bar.update()

            try:
                results = evaluate_suites(
                    suites,
                    contenders,
                    reference,
                    settings,
                    store,
                    suite_settings=plan["suite_settings"],
                    on_cell=on_cell,
                )
            finally:
                if bar is not None:
                    bar.close()
            meta = provenance(settings.device)
            results["meta"] = {
                **meta,
                "machine": meta.get("device_name", meta.get("hardware")),
                "date": meta["created_utc"],
                "wall_s": time.perf_counter() - start,
                "cells_reused": store.reused,
                "cells_computed": store.computed,
                "family": plan["family_source"],
                "meta_training_horizon": plan["horizon"],
                "settings": settings.config(),
            }
            results["suite_entries"] = {s.name: s.config() for s in suites}
            outputs = write_outputs(results, run_dir)
            tracker.log_tables(outputs["tables"])
            tracker.log_images(outputs["images"])
            if "ood" in results:
                tracker.summary(
                    {
                        f"ood/{n}/iqm_speedup": a["iqm_speedup"]
                        for n, a in results["ood"]["aggregate"].items()
                    }
                )
        log.info(
            "finished in %.1f s (%d cells computed, %d reused)",
            results["meta"]["wall_s"],
            store.computed,
            store.reused,
        )
        print(
            f"{PROG}: {store.computed} cells computed, {store.reused} reused, "
            f"{results['meta']['wall_s']:.0f} s; tables: {run_dir / 'summary.md'}"
        )
        return results
    finally:
        log.removeHandler(handler)
        handler.close()


def _error(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(code)


def _hydra_app(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as err:
        _error(str(err))
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; finished cells are kept in {cfg.run_dir}/cells and reused: "
            "run the same command again to continue",
            file=sys.stderr,
        )
        sys.exit(130)


def _precheck(args: Sequence[str]) -> None:
    """Compose once before Hydra runs, so that a bad override is one line (values, names and
    the run_dir are checked by :func:`run`, before it creates anything)."""
    if any(a.startswith("-") for a in args):
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        compose_eval_config(*args)
    except (HydraException, OmegaConfBaseException) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        key = next((a.split("=")[0] for a in args if a.split("=")[0] in first), "overrides")
        _error(f"{key}: {first} (see configs/eval/default.yaml)")


def main() -> None:
    """Console entry point ``l2o-eval`` (Hydra overrides on the command line)."""
    if not (CONFIG_DIR / f"{CONFIG_NAME}.yaml").is_file():
        sys.exit(
            f"{PROG}: config {CONFIG_DIR / CONFIG_NAME}.yaml not found; {PROG} runs from a "
            "source checkout: pip install -e <the l2o repository>"
        )
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _precheck(sys.argv[1:])
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base=None)(
        _hydra_app
    )()


if __name__ == "__main__":
    main()
