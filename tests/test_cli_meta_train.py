"""``l2o-meta-train``: configs compose, bad configs fail before any work, runs resume exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException

from l2o.cli.meta_train import run
from l2o.learned.checkpoint import load_checkpoint
from l2o.meta.configure import ConfigError, build, compose_config
from l2o.meta.trainer import ResumeError
from l2o.tasks.augment import ReparamTask


def _cfg(tmp_path, *overrides):
    return compose_config(
        "experiment=smoke", f"run_dir={tmp_path / 'run'}", "wandb.mode=disabled", *overrides
    )


@pytest.mark.parametrize("experiment", ["default", "smoke", "mlp_family"])
@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_every_experiment_and_estimator_composes_and_validates(tmp_path, experiment, estimator):
    from l2o.meta.configure import validate_config

    cfg = _cfg(tmp_path, f"experiment={experiment}", f"estimator={estimator}")
    validate_config(cfg)
    built = build(cfg, "cpu")["estimator"]
    assert type(built).__name__ == {"tbptt": "TruncatedBPTT", "es": "ES", "pes": "PES"}[estimator]
    assert built.population == cfg.estimator.population  # the composed numbers are what runs


EXPERIMENTS = sorted(
    p.stem for p in (Path(__file__).parent.parent / "configs" / "experiment").glob("*.yaml")
)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_composes_validates_and_builds(tmp_path, experiment):
    from l2o.meta.configure import validate_config

    cfg = _cfg(tmp_path, f"experiment={experiment}")
    validate_config(cfg)
    built = build(cfg, "cpu")
    assert built["estimator"].population == cfg.estimator.population


def test_the_mixture_recipe_draws_mlps_and_cnns_over_long_episodes(tmp_path):
    cfg = _cfg(tmp_path, "experiment=ortho_mixture")
    family = build(cfg, "cpu")["estimator"].family
    tasks = [family.sample(seed) for seed in range(40)]
    augmented = [t for t in tasks if isinstance(t, ReparamTask)]
    bases = {type(t.base if isinstance(t, ReparamTask) else t).__name__ for t in tasks}
    assert bases == {"MLPClassifierTask", "ConvNetTask"}
    assert 0 < len(augmented) < len(tasks)
    assert {t.config()["dataset"] for t in tasks if not isinstance(t, ReparamTask)} == {
        "mnist1d",
        "digits",
    }
    assert cfg.estimator.horizon >= 2000 and cfg.estimator.horizon_schedule == "log_uniform"


def test_the_long_mixture_recipe_draws_five_fixed_structures_with_a_sequence_model(tmp_path):
    """Each member is one structure, so the compiled truncation scan compiles once per member
    instead of once per draw."""
    cfg = _cfg(tmp_path, "experiment=ortho_long_mixture")
    family = build(cfg, "cpu")["estimator"].family
    tasks = [family.sample(seed) for seed in range(60)]
    configs = {repr(sorted(task.config().items())) for task in tasks}
    assert len(configs) == 5
    names = [task.name for task in tasks]
    assert set(names) == {"mlp", "cnn", "char_transformer"}
    assert names.count("mlp") > names.count("cnn")  # the core MNIST-1D MLP has weight 2
    assert cfg.estimator.compile and cfg.estimator.truncation == 100
    assert cfg.estimator.horizon >= 2000 and cfg.lopt.vector_rule == "adamw"


def test_smoke_run_writes_checkpoints_that_load(tmp_path):
    result = run(_cfg(tmp_path))
    assert len(result["history"]) == 3
    lopt, meta_params, card = load_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    assert lopt.name == "mlp"
    for k, v in result["meta_params"].items():
        assert torch.equal(meta_params[k], v.cpu())
    assert card["config"]["estimator"]["_target_"] == "l2o.meta.estimators.TruncatedBPTT"
    assert card["provenance"]["outer_step"] == 3
    assert result["eval_before"] is not None and result["eval_after"] is not None


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_cli_resume_continues_exactly(tmp_path, estimator):
    common = (f"estimator={estimator}", "estimator.horizon_schedule=log_uniform", "eval.seeds=0")
    full = run(_cfg(tmp_path / "a", *common, "outer_steps=4"))
    run(_cfg(tmp_path / "b", *common, "outer_steps=2"))
    resumed = run(_cfg(tmp_path / "b", *common, "outer_steps=4", "resume=true"))
    for k, v in full["meta_params"].items():
        assert torch.equal(resumed["meta_params"][k], v), k
    assert len(resumed["history"]) == 4


def test_resume_with_another_config_is_refused(tmp_path):
    run(_cfg(tmp_path, "outer_steps=1", "eval.seeds=0"))
    with pytest.raises(
        ConfigError, match=r"^seed: the run being resumed was made with another seed"
    ):
        run(_cfg(tmp_path, "outer_steps=2", "resume=true", "seed=5"))


def test_fresh_run_refuses_to_clobber_an_existing_run_unless_told(tmp_path):
    run(_cfg(tmp_path, "outer_steps=1", "eval.seeds=0"))
    with pytest.raises(ConfigError, match=r"already holds a run.*resume=true"):
        run(_cfg(tmp_path, "outer_steps=1", "eval.seeds=0"))
    result = run(_cfg(tmp_path, "outer_steps=1", "eval.seeds=0", "overwrite=true"))
    assert len(result["history"]) == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["estimator.truncation=50", "estimator.horizon=20"],
            r"^estimator\.truncation: estimator\.truncation=50 > estimator\.horizon=20 \(a trunc",
        ),
        (["estimator._target_=l2o.meta.estimators.SGD"], r"^estimator\._target_: unknown est"),
        (["estimator._target_=l2o.learned.MLPLOpt"], r"is not a TruncatedEstimator"),
        (["estimator.population=0"], r"^estimator\.population: must be positive"),
        (["estimator.population=100000000"], r"^estimator\.population: must be <= 65,536"),
        (["estimator.horizon=10000000000"], r"^estimator\.horizon: must be <= 10,000,000"),
        (["estimator=pes", "estimator.population=3"], r"^estimator\.population: .*=3 must be even"),
        (["outer_steps=0"], r"^outer_steps: must be positive"),
        (["checkpoint_every=-1"], r"^checkpoint_every: must be >= 0"),
        (["eval.seeds=-2"], r"^eval\.seeds: must be >= 0"),
        (["estimator.meta_loss=mse"], r"^estimator\.meta_loss: unknown meta-loss .*=mse \(known"),
        (
            ["estimator.truncation_weighting=final"],
            r"^estimator\.truncation_weighting: unknown truncation weighting .*\(known: linear",
        ),
        (
            ["estimator.update_schedule=exponential"],
            r"^estimator\.update_schedule: unknown update schedule .*\(known: constant, cosine",
        ),
        (["deploy_schedule=step"], r"^deploy_schedule: unknown update schedule .*known: .*wsd"),
        (["meta_grad_clip=-1"], r"^meta_grad_clip: must be a number >= 0"),
        (["seed=99999999999999999999"], r"^seed: must be <= "),
        (["seed=-1"], r"^seed: must be >= 0"),
        (["device=tpu"], r"^device: must be auto, cpu or cuda"),
        (["device=cuda:abc"], r"^device: 'cuda:abc' is not a device"),
        (["threads=0"], r"^threads: must be positive"),
        (["lopt._target_=l2o.learned.NoSuchLOpt"], r"^lopt\._target_: unknown lopt: lopt\._t"),
        (["task._target_=l2o.optim.rules.Adam"], r"^task\._target_: .*rules\.Adam is not a Task"),
        (["outer_optim._target_=l2o.optim.rules.Adamm"], r"^outer_optim\._target_: unknown"),
        (["outer_optim._target_=l2o.learned.MLPLOpt"], r"is not a UpdateRule"),
        (["lopt.hidden_sizes=[0]"], r"^lopt: hidden_sizes must be positive"),
        (["task.dim=[0,4]"], r"^task: "),
    ],
)
def test_bad_config_fails_before_any_work_naming_the_key(tmp_path, overrides, message):
    cfg = _cfg(tmp_path, *overrides)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file_or_the_shipped_checkpoints_is_refused(tmp_path, monkeypatch):
    from l2o.learned.checkpoint import SHIPPED_DIR

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"^run_dir: .*file is a file"):
        run(_cfg(tmp_path, f"run_dir={tmp_path / 'file'}"))
    for shipped_parent in (SHIPPED_DIR.parent, SHIPPED_DIR):
        with pytest.raises(ConfigError, match=r"^run_dir: .*shipped checkpoints folder"):
            run(_cfg(tmp_path, f"run_dir={shipped_parent}"))
    monkeypatch.setattr(os, "access", lambda *a: False)  # as a non-root user without rights
    with pytest.raises(ConfigError, match=r"^run_dir: .* is not writable"):
        run(_cfg(tmp_path))


def test_unknown_config_group_choice_names_the_group(tmp_path):
    with pytest.raises(MissingConfigException, match="lopt/adam"):
        _cfg(tmp_path, "lopt=adam")


def _cli(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    script = "from l2o.cli.meta_train import main; main()"
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_console_script_runs_the_smoke_experiment(tmp_path):
    proc = _cli("experiment=smoke", f"run_dir={tmp_path / 'run'}", "progress=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out meta-loss" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.json").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert not (tmp_path / "run" / ".hydra").exists()
    log = (tmp_path / "run" / "meta_train.log").read_text()
    assert "start run_dir=" in log and "trained to outer step 3" in log


def test_console_script_reports_a_bad_key_and_exits_2(tmp_path):
    proc = _cli(
        "experiment=smoke",
        f"run_dir={tmp_path / 'run'}",
        "estimator.truncation=9",
        "estimator.horizon=4",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("l2o-meta-train: error: estimator.truncation: estimator.trunc")
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert not (tmp_path / "run").exists()  # nothing created for a refused command


def test_offline_wandb_run_holds_the_trainers_metrics(tmp_path):
    from l2o.tracking import read_offline_run

    result = run(_cfg(tmp_path, "wandb.mode=offline", "eval.seeds=1"))
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    logged = read_offline_run(run_dir)
    rows = [r for r in logged["history"] if "meta_loss" in r]
    assert [r["meta_loss"] for r in rows] == pytest.approx(
        [h["meta_loss"] for h in result["history"]]
    )
    for key in (
        "meta_grad_norm",
        "inner_loss",
        "outer_step_time",
        "task_steps_per_sec",
        "outer_lr",
    ):
        assert all(key in r for r in rows), key
    assert logged["summary"]["eval_meta_loss_final"] == pytest.approx(result["eval_after"])
    assert logged["config"]["estimator"]["_target_"].endswith("TruncatedBPTT")


def test_missing_config_directory_is_reported(tmp_path, monkeypatch):
    from l2o.cli import meta_train

    monkeypatch.setattr(meta_train, "CONFIG_DIR", tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"config directory .*nowhere.* not found"):
        meta_train.main()


def test_resuming_a_finished_run_asks_for_more_outer_steps(tmp_path):
    run(_cfg(tmp_path, "outer_steps=1", "eval.seeds=0"))
    with pytest.raises(ResumeError, match="already finished 1 outer steps; raise outer_steps"):
        run(_cfg(tmp_path, "outer_steps=1", "resume=true"))


def test_warm_start_begins_from_the_checkpoint_and_records_it(tmp_path):
    from l2o.learned.checkpoint import checkpoint_id

    first = run(_cfg(tmp_path / "a", "outer_steps=2"))
    source = tmp_path / "a" / "run" / "checkpoints" / "last"
    _, source_params, source_card = load_checkpoint(source)
    warm = run(_cfg(tmp_path / "b", "outer_steps=1", f"init_from={source}"))
    # Same held-out seeds: the warm run's "before" is the first run's "after".
    assert warm["eval_before"] == pytest.approx(first["eval_after"], rel=1e-6)
    _, params, card = load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last")
    assert card["provenance"]["init_from"] == checkpoint_id(source_card)
    assert any(not torch.equal(params[k], source_params[k]) for k in params)  # it trained on
    with pytest.raises(ConfigError, match="another init_from"):
        run(_cfg(tmp_path / "b", "outer_steps=2", "resume=true"))


def test_warm_start_from_another_lopt_or_a_bad_file_is_refused_before_any_work(tmp_path):
    run(_cfg(tmp_path / "a", "outer_steps=1", "eval.seeds=0"))
    source = tmp_path / "a" / "run" / "checkpoints" / "last"
    with pytest.raises(ConfigError, match=r"init_from=.*holds MLPLOpt.*set lopt"):
        run(_cfg(tmp_path / "b", f"init_from={source}", "lopt.hidden_sizes=[8]"))
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ConfigError, match=r"init_from=.*junk"):
        run(_cfg(tmp_path / "b", f"init_from={tmp_path / 'junk'}"))
    with pytest.raises(ConfigError, match="init_from=no_such_shipped_name"):
        run(_cfg(tmp_path / "b", "init_from=no_such_shipped_name"))
    assert not (tmp_path / "b" / "run").exists()


@pytest.mark.parametrize(
    ("checkpoint", "experiment"),
    [
        ("mlp_2x32", "mnist1d_mlp"),
        ("ortho_mlp", "ortho_mlp"),
        ("ortho_adamw_vectors", "ortho_adamw_vectors"),
        ("ortho_long", "ortho_long"),
        ("ortho_long_p32", "ortho_long_p32"),
        ("ortho_long_mixture", "ortho_long_mixture"),
    ],
)
def test_shipped_checkpoint_was_trained_by_the_experiment_config_that_claims_it(
    checkpoint, experiment
):
    """configs/experiment/<experiment>.yaml must stay the recipe of checkpoints/<checkpoint>."""
    from omegaconf import OmegaConf

    from l2o.learned.checkpoint import resolve_checkpoint
    from l2o.meta.configure import build

    recipe = compose_config(f"experiment={experiment}")
    _, _, card = load_checkpoint(resolve_checkpoint(checkpoint))
    # The card records the config as it was; what it builds must be what the recipe builds.
    shipped = OmegaConf.create(card["config"])
    shipped.outer_optim = _as_direct_rule_config(card["config"]["outer_optim"])
    shipped.estimator = _as_direct_estimator_config(card["config"]["estimator"])
    built = [build(c, "cpu") for c in (shipped, recipe)]
    assert built[0]["outer_rule"] == built[1]["outer_rule"]
    estimators = [b["estimator"] for b in built]
    assert type(estimators[0]) is type(estimators[1])
    for attr in ("population", "truncation", "horizon", "horizon_schedule", "min_horizon"):
        assert getattr(estimators[0], attr) == getattr(estimators[1], attr), attr
    assert estimators[0].meta_loss.name == estimators[1].meta_loss.name
    assert built[0]["lopt"].config() == built[1]["lopt"].config()
    assert repr(built[0]["task"]) == repr(built[1]["task"])
    for key in ("seed", "meta_grad_clip", "init_from", "outer_steps"):
        assert card["config"].get(key) == OmegaConf.to_container(recipe, resolve=True)[key], key
    assert card["provenance"]["outer_step"] == recipe.outer_steps


def _as_direct_rule_config(old: dict) -> dict:
    """Configs before the optim group instantiated rules directly went through the registry
    (``_target_: l2o.optim.registry.get``, ``name: adam``)."""
    if old.get("_target_") != "l2o.optim.registry.get":
        return old
    from l2o.optim import registry

    rule_cls = registry._REGISTRY[old["name"]].rule_cls
    fields = {k: v for k, v in old.items() if k not in ("_target_", "name")}
    return {"_target_": f"{rule_cls.__module__}.{rule_cls.__qualname__}", **fields}


def _as_direct_estimator_config(old: dict) -> dict:
    """Estimator configs before they instantiated their classes directly went through
    ``l2o.meta.estimators.get_estimator`` with a ``name``."""
    if old.get("_target_") != "l2o.meta.estimators.get_estimator":
        return old
    from l2o.meta.estimators import ESTIMATORS

    cls = ESTIMATORS[old["name"]]
    fields = {k: v for k, v in old.items() if k not in ("_target_", "name")}
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **fields}
