"""l2o-eval: metrics on hand-made curves, LR tuning, the runs, the command end to end, resume."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir

from l2o.cli.eval import build_plan, compose_eval_config
from l2o.cli.eval import run as run_eval
from l2o.eval.cells import CellStore
from l2o.eval.contenders import ContenderError, rule_contender, torch_contender
from l2o.eval.evaluation import Settings, _tune
from l2o.eval.metrics import iqm, iqm_interval, seed_scores, smooth
from l2o.eval.report import fmt
from l2o.eval.runs import run_rule, run_torch
from l2o.meta.configure import CONFIG_DIR, ConfigError
from l2o.optim import registry
from l2o.tasks.suites import HELD_OUT_SEED, SuiteEntry, get_suite, tuning_seeds
from l2o.tasks.supervised import ConvNetTask, MLPClassifierTask
from l2o.tasks.synthetic import QuadraticTask

# --- metrics on hand-made curves ----------------------------------------------------------------


def _column(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[:, None]


REFERENCE = [10.0 - t for t in range(10)]  # reaches its final loss 1.0 at step 10


def test_smoothing_is_a_trailing_mean():
    x = np.array([4.0, 2.0, 6.0, 8.0, 0.0])
    expected = [4.0, 3.0, 4.0, (2 + 6 + 8) / 3, (6 + 8 + 0) / 3]
    assert smooth(_column(x), window=3)[:, 0].tolist() == pytest.approx(expected)


def test_speedup_of_a_faster_optimizer():
    # 10, 8, 6, 4, 2, 0.5, ...: first <= 1.0 (the reference's final) at its 6th step.
    faster = [max(10.0 - 2 * t, 0.5) for t in range(10)]
    (score,) = seed_scores(_column(faster), _column(REFERENCE), window=1)
    assert score.steps_to_reference == 6
    assert score.speedup == pytest.approx(10 / 6)
    assert score.normalized_loss == pytest.approx(0.5 / 1.0)
    assert not score.diverged


def test_speedup_of_a_slower_optimizer():
    # Ends at 5.5 and never reaches 1.0; the reference reaches 5.5 (value 5) at its 6th step.
    slower = [10.0 - 0.5 * t for t in range(10)]
    (score,) = seed_scores(_column(slower), _column(REFERENCE), window=1)
    assert score.steps_to_reference is None
    assert score.speedup == pytest.approx(6 / 10)
    assert score.normalized_loss == pytest.approx(5.5)


def test_the_reference_against_itself_scores_one():
    noisy = torch.tensor([[5.0, 3.0, 4.0, 2.0, 2.5, 1.5, 2.0]]).T
    (score,) = seed_scores(noisy, noisy, window=2)
    assert score.speedup == 1.0 and score.normalized_loss == 1.0


def test_divergence_non_finite_or_above_the_factor():
    nan_run = [10.0, 5.0, math.nan] + [1.0] * 7
    blown_up = [10.0 + 2 * t for t in range(10)]  # ends at 28 > 2 x 10
    mild = [10.0 + t for t in range(10)]  # ends at 19 <= 2 x 10: worse, not diverged
    scores = seed_scores(
        torch.tensor([nan_run, blown_up, mild], dtype=torch.float64).T,
        torch.tensor([REFERENCE] * 3).T,
        window=1,
        divergence_factor=2.0,
    )
    assert [s.diverged for s in scores] == [True, True, False]
    assert scores[0].speedup == 0.0 and scores[0].normalized_loss == math.inf
    assert scores[1].speedup == 0.0
    assert scores[2].normalized_loss == pytest.approx(19.0)


def test_a_diverged_reference_gives_no_score():
    (score,) = seed_scores(_column(REFERENCE), _column([10.0, math.inf] + [1.0] * 8), window=1)
    assert math.isnan(score.speedup) and math.isnan(score.normalized_loss)


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx((3 + 4 + 5 + 6) / 4)
    # 10 values: 2 trimmed on each side (floor of 25%), the middle 6 averaged.
    assert iqm([9, 1, 8, 2, 7, 3, 6, 4, 5, 100]) == pytest.approx((3 + 4 + 5 + 6 + 7 + 8) / 6)
    assert iqm([1, 2, 3, math.inf]) == pytest.approx(2.5)  # one diverged task out of four
    assert iqm([1.0, math.nan, 3.0]) == pytest.approx(2.0)  # NaN (no reference) left out


def _numpy_stratified_interval(tasks, resamples, confidence, seed):
    """Independent stratified bootstrap: resample each task's seeds, IQM of the pool."""
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(resamples):
        pooled = np.concatenate([rng.choice(t, size=len(t), replace=True) for t in tasks])
        pooled.sort()
        cut = int(0.25 * len(pooled))
        stats.append(pooled[cut : len(pooled) - cut].mean())
    alpha = (1 - confidence) / 2
    return np.quantile(stats, alpha), np.quantile(stats, 1 - alpha)


def test_bootstrap_interval_matches_an_independent_stratified_bootstrap():
    rng = np.random.default_rng(1)
    tasks = [rng.lognormal(mean=m, sigma=0.3, size=6) for m in (0.0, 0.3, -0.2, 0.5)]
    low, high = iqm_interval(tasks, confidence=0.95, n_resamples=20000, seed=0)
    ref_low, ref_high = _numpy_stratified_interval(tasks, 20000, 0.95, seed=1)
    assert low == pytest.approx(ref_low, abs=0.02)
    assert high == pytest.approx(ref_high, abs=0.02)
    point = iqm(np.concatenate(tasks))
    assert low < point < high


def test_bootstrap_interval_of_constant_tasks_is_the_value():
    assert iqm_interval([[2.0, 2.0], [2.0, 2.0, 2.0]]) == (2.0, 2.0)
    # Tasks are strata: resampling never mixes tasks, so per-task constants give a point.
    low, high = iqm_interval([[1.0, 1.0], [3.0, 3.0]])
    assert low == high == pytest.approx(2.0)


# --- tuning -------------------------------------------------------------------------------------


class _RecordingQuadratic(QuadraticTask):
    """A quadratic with A = I (cond 1): SGD's best step size is exactly 1 (one step to x*)."""

    def __init__(self):
        super().__init__(dim=4, cond=1.0)
        self.seen: set[int] = set()

    def problem(self, seed):
        self.seen.add(int(seed))
        return super().problem(seed)

    def init_from_seed(self, seed):
        self.seen.add(int(seed))
        return super().init_from_seed(seed)


def test_grid_search_picks_the_known_optimal_step_size_on_tuning_seeds_only(tmp_path):
    task = _RecordingQuadratic()
    entry = SuiteEntry("quadratic", task, 30, tuple(HELD_OUT_SEED + j for j in range(3)))
    settings = Settings(grid=(0.1, 0.3, 1.0, 1.5, 2.5), tuning_seeds=2, window=5)
    tuned = _tune(rule_contender("sgd"), entry, settings, CellStore(tmp_path))
    assert tuned["lr"] == 1.0
    assert tuned["grid"]["2.5"] > 1e6  # |1 - 2.5| > 1: diverges, never chosen
    assert tuned["grid"]["1"] < tuned["grid"]["1.5"] < tuned["grid"]["0.3"]
    assert task.seen == set(tuning_seeds(2))
    assert task.seen.isdisjoint(entry.seeds)


def test_tuning_and_evaluation_seeds_are_disjoint():
    suite = get_suite("in_distribution", n_tasks=1, n_seeds=50)
    assert set(tuning_seeds(50)).isdisjoint(suite[0].seeds)


# --- runs ---------------------------------------------------------------------------------------


def test_external_torch_adam_matches_the_registered_adam_rule():
    task = MLPClassifierTask(dataset="digits", width=16, depth=1, batch_size=32)
    seeds = (HELD_OUT_SEED, HELD_OUT_SEED + 1)
    ours = run_rule(registry.get("adam", lr=3e-3), task, seeds, 25)
    theirs = run_torch(torch_contender("torch.optim.Adam"), 3e-3, task, seeds, 25)
    torch.testing.assert_close(theirs.curves, ours.curves, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(theirs.eval_losses, ours.eval_losses, rtol=2e-4, atol=2e-5)


def test_conv_net_with_group_norm():
    task = ConvNetTask(dataset="digits", channels=(8, 16), norm="group")
    params = task.init_from_seed(0)
    assert params["1.weight"].eq(1).all() and params["1.bias"].eq(0).all()
    x, _ = task.batch(0, 0)
    first = {k: v for k, v in params.items() if k.split(".")[0] in ("0", "1")}
    normed = torch.func.functional_call(task.module[:2], first, (x.reshape(-1, 1, 8, 8),))
    grouped = normed.reshape(len(x), 4, -1)  # 8 channels in 4 groups
    torch.testing.assert_close(grouped.mean(-1), torch.zeros(len(x), 4), atol=1e-4, rtol=0)
    assert task.config()["norm"] == "group"
    assert "norm" not in ConvNetTask().config()  # unchanged for networks without one
    with pytest.raises(ValueError, match="norm"):
        ConvNetTask(norm="batch")


def test_real_models_suite_is_what_the_issue_asks_for():
    suite = get_suite("real_models")
    by_name = {e.task.name: e for e in suite}
    transformer = by_name["char_transformer"]
    count = sum(p.numel() for p in transformer.task.init_from_seed(0).values())
    assert count >= 400_000 and transformer.horizon >= 2000
    assert any("ln" in name for name in transformer.task.init_from_seed(0))  # pre-LN blocks
    assert by_name["cnn"].task.norm == "group"
    assert {"char_lstm", "autoencoder"} <= set(by_name)
    assert max(e.horizon for e in suite) >= 10_000


def test_suites_drop_repeated_tasks():
    family = {"name": "mlp", "width": [32, 32], "depth": [1, 1], "activations": ["relu"]}
    family |= {"batch_size": [64, 64], "init_scale": [1.0, 1.0]}
    assert len(get_suite("in_distribution", family=family, n_tasks=3)) == 1


# --- contenders ---------------------------------------------------------------------------------


def test_external_optimizer_errors_name_the_problem():
    with pytest.raises(ContenderError, match=r"torch\.optim\.Adamm"):
        torch_contender("torch.optim.Adamm")
    with pytest.raises(ContenderError, match="cannot import"):
        torch_contender("no_such_package.Opt")
    with pytest.raises(ContenderError, match=r"not a torch\.optim\.Optimizer"):
        torch_contender("torch.nn.Linear")
    with pytest.raises(ContenderError, match="momentun"):
        torch_contender("torch.optim.SGD", {"momentun": 0.9})
    with pytest.raises(ContenderError, match="lr is tuned"):
        rule_contender("adam", {"lr": 0.1})


# --- the command --------------------------------------------------------------------------------

TINY = (
    "suite=[in_distribution,loss_scale_change]",
    "family={name: mlp, datasets: [digits], width: [8, 16], depth: [1, 1], batch_size: [32, 32]}",
    "horizon=25",
    "n_tasks=2",
    "n_seeds=2",
    "loss_scales=[1e3]",
    "tuning.grid=[1e-2,1e-1]",
    "tuning.seeds=1",
    "bootstrap.resamples=200",
    "baselines=[sgd]",
    "external=[{target: torch.optim.RMSprop, name: RMSprop}]",
    "wandb.mode=disabled",
    "progress=false",
    "device=cpu",
)


def _tiny(tmp_path, *extra):
    return compose_eval_config(*TINY, f"run_dir={tmp_path}", *extra)


def _independent_iqm(values):
    v = np.sort(np.asarray([float(x) for x in values]))
    cut = int(0.25 * len(v))
    return v[cut : len(v) - cut].mean()


def _aggregate_rows(markdown: str, section: str) -> dict[str, list[str]]:
    lines = markdown.split(f"## {section}\n", 1)[1].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] not in ("optimizer",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_eval")
    results = run_eval(compose_eval_config(*TINY, f"run_dir={run_dir}"))
    return run_dir, results


def test_tiny_suite_writes_every_output(tiny_run):
    run_dir, _ = tiny_run
    for name in ("results.json", "results.csv", "summary.md", "config.yaml", "eval.log"):
        assert (run_dir / name).is_file(), name
    for name in ("speedup.png", "curves_in_distribution.png", "acceptance_in_distribution.png"):
        assert (run_dir / name).stat().st_size > 1000, name
    assert any((run_dir / "cells").glob("*.safetensors"))


def test_tables_equal_what_the_json_gives(tiny_run):
    run_dir, _ = tiny_run
    results = json.loads((run_dir / "results.json").read_text())
    summary = (run_dir / "summary.md").read_text()
    for suite, body in results["suites"].items():
        rows = _aggregate_rows(summary, suite)
        assert set(rows) == set(results["optimizers"])
        for name, cells in rows.items():
            seeds = [s for t in body["tasks"].values() for s in t["optimizers"][name]["seeds"]]
            assert cells[1] == fmt(float(_independent_iqm([s["speedup"] for s in seeds])))
            normalized = [s["normalized_loss"] for s in seeds]
            assert cells[3] == fmt(float(_independent_iqm(normalized)))
            finals = [float(t["optimizers"][name]["final_loss"]) for t in body["tasks"].values()]
            reference = [
                float(t["optimizers"]["adam"]["final_loss"]) for t in body["tasks"].values()
            ]
            assert cells[5] == fmt(float(np.mean(np.array(finals) < np.array(reference))))
            diverged = sum(s["diverged"] for s in seeds)
            assert cells[6] == f"{diverged}/{len(seeds)}"
    ood = _aggregate_rows(summary, "All out-of-distribution suites")
    pooled = results["suites"]["loss_scale_change"]["tasks"].values()
    speedups = [s["speedup"] for t in pooled for s in t["optimizers"]["default"]["seeds"]]
    assert ood["default"][1] == fmt(float(_independent_iqm(speedups)))
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]
    task = results["suites"][first["suite"]]["tasks"][first["task"]]["optimizers"]
    seeds = task[first["optimizer"]]["seeds"]
    assert float(first["final_loss"]) == pytest.approx(np.mean([s["final_loss"] for s in seeds]))


def test_results_carry_tuned_rates_and_all_kinds(tiny_run):
    _, results = tiny_run
    task = next(iter(results["suites"]["in_distribution"]["tasks"].values()))
    kinds = {r["kind"] for r in task["optimizers"].values()}
    assert kinds == {"rule", "learned", "guarded", "torch"}
    for name in ("adam", "sgd", "RMSprop", "default+guard(adam)"):
        assert task["optimizers"][name]["lr"] in (1e-2, 1e-1)
        assert task["optimizers"][name]["tuning"]["seeds"] == list(tuning_seeds(1))
    guarded = task["optimizers"]["default+guard(adam)"]
    assert guarded["acceptance"] and all(0 <= a[1] <= 1 for a in guarded["acceptance"])


def _tables(run_dir) -> str:
    """summary.md without what measures time (the wall-time line, the ms/step column): a cell
    computed again gets the same figures but not the same timing."""
    lines = []
    for line in (run_dir / "summary.md").read_text().splitlines():
        if line.startswith("Machine:"):
            continue
        cells = line.split("|")
        if len(cells) == 13:  # a per-task row: | task | ... | ms/step | acceptance |
            del cells[10]
        lines.append("|".join(cells))
    return "\n".join(lines)


def test_resume_reuses_finished_cells_and_gives_the_same_tables(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    before = _tables(run_dir)
    cells = sorted((run_dir / "cells").glob("*.safetensors"))
    # An interrupted run: the last cells never finished.
    copy = tmp_path / "run"
    (copy / "cells").mkdir(parents=True)
    for path in cells[: len(cells) // 2]:
        (copy / "cells" / path.name).write_bytes(path.read_bytes())
    (copy / "config.yaml").write_text(
        (run_dir / "config.yaml").read_text().replace(str(run_dir), str(copy))
    )
    results = run_eval(_tiny(copy))
    assert results["meta"]["cells_reused"] == len(cells) // 2
    assert results["meta"]["cells_computed"] == len(cells) - len(cells) // 2
    assert _tables(copy) == before
    again = run_eval(_tiny(copy))
    assert again["meta"]["cells_computed"] == 0
    assert _tables(copy) == before


def _copy_of_cells(run_dir, copy):
    """A new run directory holding a copy of ``run_dir``'s finished cells; and those cells."""
    (copy / "cells").mkdir(parents=True)
    cells = sorted((run_dir / "cells").glob("*.safetensors"))
    for path in cells:
        (copy / "cells" / path.name).write_bytes(path.read_bytes())
    return copy, cells


def test_a_damaged_cell_is_computed_again(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy, cells = _copy_of_cells(run_dir, tmp_path / "run")
    (copy / "cells" / cells[0].name).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable cell"):
        results = run_eval(_tiny(copy))
    assert results["meta"]["cells_computed"] == 1


def test_a_cell_of_the_wrong_shape_is_computed_again(tiny_run, tmp_path):
    import safetensors.torch

    run_dir, _ = tiny_run
    copy, cells = _copy_of_cells(run_dir, tmp_path / "run")
    forged = next(p for p in cells if "curves" in safetensors.torch.load_file(p))
    with safetensors.safe_open(str(forged), framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors.torch.load_file(forged)
    tensors["curves"] = tensors["curves"][:3]  # a truncated curve under the right key
    safetensors.torch.save_file(tensors, copy / "cells" / forged.name, metadata)
    with pytest.warns(UserWarning, match="tensor 'curves'"):
        results = run_eval(_tiny(copy))
    assert results["meta"]["cells_computed"] == 1


def test_a_run_dir_of_another_evaluation_is_refused(tiny_run):
    run_dir, _ = tiny_run
    with pytest.raises(ConfigError, match="n_seeds"):
        run_eval(compose_eval_config(*TINY, f"run_dir={run_dir}", "n_seeds=3"))


@pytest.mark.parametrize(
    ("override", "key", "named"),
    [
        ("suite=horizon_x1000", "suite", "horizon_x1000"),
        ("baselines=[adamm]", "baselines.0", "adamm"),
        ("external=[{target: torch.optim.Adamm}]", "external.0", "torch.optim.Adamm"),
        ("checkpoints=[no_such_checkpoint]", "checkpoints.0", "no_such_checkpoint"),
        ("checkpoints=[/nonexistent/ckpt]", "checkpoints.0", "/nonexistent/ckpt"),
        ("reference=nope", "reference", "nope"),
        ("tuning.grid=[]", "tuning.grid", "learning rates"),
        ("family=nope_family", "family", "nope_family"),
    ],
)
def test_unknown_names_fail_before_any_work(tmp_path, override, key, named):
    with pytest.raises(ConfigError) as err:
        build_plan(_tiny(tmp_path / "run", override))
    assert err.value.key == key and named in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("checkpoint", "horizon"), [("default", 775), ("ortho_mlp", 316), ("mlp_2x32", 200)]
)
@pytest.mark.parametrize("alone", ["true", "false"])
def test_the_horizon_is_the_first_checkpoints_median_meta_training_episode(
    tmp_path, checkpoint, horizon, alone
):
    """ortho_long_mixture (the default) was meta-trained on episodes of 200 to 3,000 steps
    drawn log-uniformly (median 775), ortho_mlp on 100 to 1,000 (median 316); mlp_2x32 on
    200-step episodes. The same when the checkpoint is evaluated only under the guard."""
    cfg = compose_eval_config(
        f"checkpoints=[{checkpoint}]",
        f"guard.unguarded={alone}",
        "wandb.mode=disabled",
        f"run_dir={tmp_path / 'run'}",
    )
    plan = build_plan(cfg)
    assert plan["horizon"] == horizon
    (in_distribution,) = plan["suites"]  # the default suite
    assert {entry.horizon for entry in in_distribution} == {horizon}
    assert not (tmp_path / "run").exists()


def test_the_command_reports_one_line_and_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "l2o.cli.eval", "suite=nope", f"run_dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("l2o-eval: error: suite: unknown suite 'nope'")
    assert not run_dir.exists()


def _torch_sgd_losses(task, seeds, steps, lr, momentum=0.0) -> torch.Tensor:
    """``[steps, seeds]`` minibatch losses of ``torch.optim.SGD``: a loop no l2o code runs."""
    out = torch.empty(steps, len(seeds), dtype=torch.float64)
    for j, seed in enumerate(seeds):
        params = {k: v.clone().requires_grad_() for k, v in task.init_from_seed(seed).items()}
        opt = torch.optim.SGD(params.values(), lr=lr, momentum=momentum)
        for step in range(steps):
            opt.zero_grad()
            loss = task.loss(params, task.batch(seed, step))
            loss.backward()
            opt.step()
            out[step, j] = float(loss.detach())
    return out


def test_rule_runs_match_a_torch_optim_loop():
    task = QuadraticTask(dim=5, cond=10.0, noise_std=0.1)
    seeds = (3, 4)
    run = run_rule(registry.get("sgd", lr=0.3, momentum=0.9), task, seeds, 25)
    expected = _torch_sgd_losses(task, seeds, 25, 0.3, momentum=0.9)
    torch.testing.assert_close(run.curves.double(), expected, rtol=1e-5, atol=1e-7)


def test_grid_finals_are_the_smoothed_final_losses_of_each_rate(tmp_path):
    task = QuadraticTask(dim=5, cond=10.0)
    grid = (1e-3, 0.1, 1.0, 30.0)
    entry = SuiteEntry("quadratic", task, 20, (HELD_OUT_SEED,))
    tuned = _tune(
        rule_contender("sgd"), entry, Settings(grid=grid, tuning_seeds=2), CellStore(tmp_path)
    )
    for lr in grid:
        losses = _torch_sgd_losses(task, tuning_seeds(2), 20, lr).mean(dim=1)
        final = float(losses[-10:].mean())
        if math.isfinite(final):
            assert tuned["grid"][f"{lr:g}"] == pytest.approx(final, rel=1e-5)
        else:
            assert tuned["grid"][f"{lr:g}"] == math.inf
    assert tuned["lr"] == 1.0 and not tuned["at_edge"]


def test_offline_wandb_run_holds_the_tables_and_images(tiny_run, tmp_path):
    from l2o.tracking import read_offline_run

    run_dir, _ = tiny_run
    copy = tmp_path / "run"
    (copy / "cells").mkdir(parents=True)
    for path in (run_dir / "cells").glob("*.safetensors"):
        (copy / "cells" / path.name).write_bytes(path.read_bytes())
    run_eval(_tiny(copy, "wandb.mode=offline"))
    (wandb_dir,) = (copy / "wandb").glob("offline-run-*")
    logged = read_offline_run(wandb_dir)
    keys = {k for row in logged["history"] for k in row}
    media = ["results", "aggregate/in_distribution", "aggregate/ood", "speedup"]
    media += ["curves/in_distribution", "acceptance/in_distribution"]
    assert all(f"{name}/_type" in keys for name in media), sorted(keys)
    assert logged["summary"]["ood/default/iqm_speedup"] is not None


@pytest.mark.gpu
def test_tiny_suite_on_cuda(tmp_path):
    results = run_eval(_tiny(tmp_path / "run", "device=cuda", "suite=in_distribution"))
    assert results["meta"]["device"].startswith("cuda")
    rows = results["suites"]["in_distribution"]["tasks"].values()
    assert all(math.isfinite(t["optimizers"]["adam"]["final_loss"]) for t in rows)


@pytest.mark.parametrize(
    ("name", "needs"),
    [
        ("levenberg_marquardt", "residuals_and_jacobian"),
        ("adafisher", "kronecker_factors"),
        ("sophia_g", "gnb_diagonal"),
    ],
)
def test_rules_that_need_more_than_the_loss_are_refused_with_the_reason(name, needs):
    with pytest.raises(ContenderError, match=f"{name}' needs a loss function that gives {needs}"):
        rule_contender(name)


@pytest.mark.parametrize("name", ["sam", "bfgs", "newton_cg", "adahessian", "random_search"])
def test_new_hand_designed_rules_run_as_l2o_eval_baselines(name):
    from l2o.eval.contenders import RuleContender

    contender = rule_contender(name)
    task = QuadraticTask(dim=4, cond=10.0)
    lr = (1.0 if name in ("bfgs", "newton_cg") else 0.05) if contender.tunes_lr else None
    if isinstance(contender, RuleContender):  # vmapped, the task's loss as loss_fn
        run = run_rule(contender.build(lr), task, (HELD_OUT_SEED,), 20)
    else:  # its torch.optim class with a closure
        run = run_torch(contender, lr, task, (HELD_OUT_SEED,), 20)
    assert float(run.curves[-1, 0]) < float(run.curves[0, 0])


def test_a_rule_that_cannot_vmap_runs_through_its_torch_optim_class(tmp_path):
    from l2o.eval.contenders import TorchContender

    lbfgs = rule_contender("lbfgs", {"history_size": 5})
    assert isinstance(lbfgs, TorchContender) and lbfgs.cls is registry.get_class("lbfgs")
    task = QuadraticTask(dim=4, cond=10.0)
    run = run_torch(lbfgs, 1.0, task, (HELD_OUT_SEED,), 5)
    assert float(run.curves[-1, 0]) < 1e-3 * float(run.curves[0, 0])  # quasi-Newton
    with pytest.raises(ConfigError, match=r"^reference: lbfgs cannot run under vmap"):
        build_plan(_tiny(tmp_path / "run", "reference=lbfgs"))


def test_speedup_plot_accepts_an_interval_that_excludes_its_estimate(tmp_path):
    """A bootstrap percentile interval can sit just above the point estimate (rounding, or a
    skewed resampling distribution); the plot draws no negative error bar for it."""
    from l2o.eval.report import plot_speedups

    aggregate = {
        "adam": {"iqm_speedup": 1.0, "speedup_ci": [1.0, 1.0]},
        "inna": {"iqm_speedup": 0.24000000000000002, "speedup_ci": [0.24000000000000005, 0.3]},
    }
    results = {
        "reference": "adam",
        "optimizers": ["adam", "inna"],
        "suites": {"in_distribution": {"aggregate": aggregate}},
    }
    assert plot_speedups(results, tmp_path / "speedup.png").is_file()


def test_a_shadow_guard_is_its_own_contender_and_ends_near_its_fallback(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy, _ = _copy_of_cells(run_dir, tmp_path / "run")
    results = run_eval(_tiny(copy, "guard.shadow=true"))
    # Only the shadow guard's cells are new: one per task (the others are reused).
    tasks = [t for s in results["suites"].values() for t in s["tasks"].values()]
    assert results["meta"]["cells_computed"] == len(tasks)
    for task in tasks:
        shadowed = task["optimizers"]["default+guard(adam,shadow)"]
        assert shadowed["kind"] == "guarded" and shadowed["lr"] == task["optimizers"]["adam"]["lr"]
        assert "default+guard(adam)" not in task["optimizers"]
        # Its shadow is the tuned-Adam reference's own run: it never ends far above it.
        assert shadowed["final_loss"] <= 1.02 * task["optimizers"]["adam"]["final_loss"]


def test_a_deferred_guard_is_its_own_contender_settled_before_its_held_out_loss(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    copy, _ = _copy_of_cells(run_dir, tmp_path / "run")
    results = run_eval(_tiny(copy, "guard.deferred=true", "guard.unguarded=false"))
    tasks = [t for s in results["suites"].values() for t in s["tasks"].values()]
    assert results["meta"]["cells_computed"] == len(tasks)  # only its own cells are new
    for task in tasks:
        deferred = task["optimizers"]["default+guard(adam,deferred)"]
        assert deferred["kind"] == "guarded" and math.isfinite(deferred["final_loss"])


def test_run_rule_settles_a_deferred_guard_on_the_batch_after_the_run():
    from l2o.guard import GuardRule
    from l2o.meta.unroll import held_out_losses, init_carry, unroll
    from l2o.optim.base import FunctionalLoss, apply_updates

    task = MLPClassifierTask(dataset="digits", width=8, depth=1, batch_size=16)
    seeds, horizon = [HELD_OUT_SEED, HELD_OUT_SEED + 1, HELD_OUT_SEED + 2], 12
    guard = GuardRule(registry.get("sgd", lr=3.0), registry.get("adam", lr=0.01), deferred=True)
    run = run_rule(guard, task, seeds, horizon)
    # The reference: the same unroll, then each member settled eagerly on its next batch.
    carry = init_carry(guard, task, torch.tensor(seeds), device="cpu")
    carry = unroll(guard, task, carry, horizon).carry
    settled, moved = {k: [] for k in carry["params"]}, 0
    for i, seed in enumerate(seeds):
        state = {k: v[i] for k, v in _flat(carry["opt_state"]).items()}
        params = {k: v[i] for k, v in carry["params"].items()}
        batch = task.batch(seed, horizon)
        loss_fn = FunctionalLoss(lambda p, b=batch: task.loss(p, b))
        updates, _ = guard.settle(_nested(state), params, loss_fn)
        moved += any(bool(u.abs().sum() > 0) for u in updates.values())
        for k, v in apply_updates(params, updates).items():
            settled[k].append(v)
    assert moved > 0  # some member's fallback candidate won the last comparison
    expected = held_out_losses(
        task, {k: torch.stack(v) for k, v in settled.items()}, seeds, [horizon] * len(seeds)
    )
    torch.testing.assert_close(run.eval_losses, expected.float())


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nested(flat):
    out = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return out


def test_a_run_dir_from_before_a_new_guard_setting_continues(tiny_run, tmp_path):
    import yaml

    run_dir, _ = tiny_run
    copy, _ = _copy_of_cells(run_dir, tmp_path / "run")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["guard"]["deferred"]  # written before deferred guards existed in l2o-eval
    saved["run_dir"] = str(copy)
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = _tiny(copy)
    # Inside an initialised Hydra, as under the l2o-eval app (a second compose there fails).
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        assert run_eval(resumed)["meta"]["cells_computed"] == 0
    with pytest.raises(ConfigError, match="other settings"):
        run_eval(_tiny(copy, "guard.deferred=true"))


@pytest.mark.parametrize(
    "key", ["guard.shadow", "guard.guarded", "guard.unguarded", "guard.deferred"]
)
def test_guard_switches_must_be_booleans(tmp_path, key):
    with pytest.raises(ConfigError, match="expected true or false") as err:
        build_plan(_tiny(tmp_path / "run", f"{key}=maybe"))
    assert err.value.key == key
