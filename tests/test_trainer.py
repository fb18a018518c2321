"""The meta-trainer's outer loop: exact resume, non-finite skipping, clipping, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from l2o.learned.base import LOpt
from l2o.learned.checkpoint import CheckpointError, checkpoint_paths
from l2o.meta.base import Estimate, GradientEstimator
from l2o.meta.trainer import (
    RESUME_FILE,
    MetaTrainer,
    ResumeError,
    clip_by_global_norm,
    load_resume_file,
    save_resume_file,
)
from l2o.optim.base import UpdateRule


@dataclasses.dataclass(frozen=True)
class _ScaledSGD(UpdateRule):
    scale: torch.Tensor

    def init(self, params):
        return {}

    def update(self, grads, state, params, *, step, loss_fn=None):
        return {k: -self.scale * g for k, g in grads.items()}, state


class ToyLOpt(LOpt):
    """Two meta-parameters: a log step size and an unused bias (so there are several tensors)."""

    name = "toy"

    def init_meta(self, generator):
        return {
            "log_lr": torch.randn(1, generator=generator),
            "b": torch.randn(3, generator=generator),
        }

    def rule(self, meta_params):
        return _ScaledSGD(meta_params["log_lr"].exp())

    def config(self):
        return {}


class NoisyQuadraticEstimator(GradientEstimator):
    """Meta-loss ‖θ - 1‖² with generator-drawn gradient noise and a stateful counter, so that a
    resume that loses the generator or the estimator state would change the trajectory."""

    name = "noisy_quadratic"
    population = 4
    truncation = 5

    def __init__(self, nan_at=()):
        self.nan_at = set(nan_at)

    def init(self, meta_params, generator):
        return {
            "calls": torch.zeros((), dtype=torch.int64),
            "drift": torch.randn(1, generator=generator),
        }

    def estimate(self, meta_params, state, generator):
        calls = int(state["calls"])
        grads, loss = {}, 0.0
        for k, v in meta_params.items():
            noise = 0.1 * torch.randn(v.shape, generator=generator)
            grads[k] = 2 * (v - 1) + noise + 0.01 * state["drift"]
            loss += float(((v - 1) ** 2).sum())
        if calls in self.nan_at:
            grads["b"] = torch.full_like(grads["b"], float("nan"))
        new_state = {"calls": state["calls"] + 1, "drift": state["drift"] * 0.9}
        return Estimate(grads, new_state, {"meta_loss": loss, "inner_loss": loss / 2})


def _adam(lr=0.05):
    from l2o.optim.registry import get

    return get("adam", lr=lr)


def _trainer(tmp_path=None, steps=8, nan_at=(), **kw) -> MetaTrainer:
    return MetaTrainer(
        ToyLOpt(),
        NoisyQuadraticEstimator(nan_at),
        _adam(),
        outer_steps=steps,
        seed=kw.pop("seed", 3),
        run_dir=tmp_path,
        **kw,
    )


def test_resumed_run_reaches_identical_meta_params_as_uninterrupted_run(tmp_path):
    full = _trainer(tmp_path / "full", steps=8, checkpoint_every=2).train()

    interrupted = _trainer(tmp_path / "cut", steps=8, checkpoint_every=3)
    for _ in range(5):  # "killed" after step 5; its last save was at step 3
        interrupted.outer_step()
        if interrupted.step % 3 == 0:
            interrupted.save()
    del interrupted

    resumed = _trainer(tmp_path / "cut", steps=8, checkpoint_every=3)
    resumed.resume()
    assert resumed.step == 3
    result = resumed.train()

    assert set(result.meta_params) == set(full.meta_params)
    for k in full.meta_params:
        assert torch.equal(result.meta_params[k], full.meta_params[k]), k
    assert [h["meta_loss"] for h in result.history] == [h["meta_loss"] for h in full.history]


def test_resume_file_loads_with_weights_only_and_holds_the_whole_state(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.train()
    assert torch.load(tmp_path / RESUME_FILE, weights_only=True)["format"] == 2
    state = load_resume_file(tmp_path / RESUME_FILE)
    assert state["step"] == 2
    assert set(state) >= {"meta_params", "outer_state", "estimator_state", "generator_state"}
    assert len(state["history"]) == 2


def test_non_finite_meta_gradient_is_skipped_and_counted(tmp_path):
    trainer = _trainer(steps=4, nan_at={1, 2})
    before = {}
    history = []
    for _ in range(4):
        before = {k: v.clone() for k, v in trainer.meta_params.items()}
        history.append(trainer.outer_step())
        if trainer.step in (2, 3):  # calls 1 and 2 returned NaN: nothing may change
            for k, v in trainer.meta_params.items():
                assert torch.equal(v, before[k])
    assert trainer.skipped_nonfinite == 2
    assert trainer.applied_updates == 2
    assert [h["skipped_nonfinite"] for h in history] == [0, 1, 2, 2]
    assert all(bool(torch.isfinite(v).all()) for v in trainer.meta_params.values())


def test_clip_by_global_norm_scales_to_the_bound_and_reports_the_raw_norm():
    grads = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped["a"], torch.tensor([0.6]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))
    same, _ = clip_by_global_norm(grads, 10.0)
    assert same["a"] is grads["a"]
    _, nan_norm = clip_by_global_norm({"a": torch.tensor([float("nan")])}, 1.0)
    assert math.isnan(nan_norm)


def test_clipping_bounds_the_first_outer_update():
    from l2o.optim.base import global_norm

    trainer = _trainer(steps=1, meta_grad_clip=1e-3)
    trainer.outer_rule = _ScaledSGD(torch.tensor(1.0))
    trainer.outer_state = {}
    before = {k: v.clone() for k, v in trainer.meta_params.items()}
    metrics = trainer.outer_step()
    moved = global_norm({k: trainer.meta_params[k] - before[k] for k in before})
    assert metrics["meta_grad_norm"] > 1e-3
    assert float(moved) == pytest.approx(1e-3, rel=1e-4)


def test_metrics_cover_the_documented_keys():
    metrics = _trainer(steps=1).outer_step()
    for key in (
        "meta_loss",
        "inner_loss",
        "meta_grad_norm",
        "outer_step_time",
        "task_steps_per_sec",
        "skipped_nonfinite",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key


def test_checkpoints_are_written_every_n_steps_with_a_provenance_card(tmp_path):
    _trainer(tmp_path, steps=4, checkpoint_every=2, config={"seed": 3}).train()
    for name in ("step_000002", "step_000004", "last"):
        tensors, card_path = checkpoint_paths(tmp_path / "checkpoints" / name)
        assert tensors.is_file() and card_path.is_file(), name
    card = json.loads(checkpoint_paths(tmp_path / "checkpoints" / "last")[1].read_text())
    assert card["lopt"]["name"] == "toy"
    assert card["config"] == {"seed": 3}
    prov = card["provenance"]
    assert prov["outer_step"] == 4
    for key in ("torch_version", "device_name", "wall_time_s"):
        assert key in prov


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),  # killed mid-copy
        lambda p: p.write_bytes(b"not a checkpoint at all"),
        lambda p: torch.save({"step": 1}, p),  # wrong layout
    ],
)
def test_corrupted_resume_file_raises_a_clear_error(tmp_path, damage):
    _trainer(tmp_path, steps=2).train()
    damage(tmp_path / RESUME_FILE)
    with pytest.raises(ResumeError, match=r"resume"):
        load_resume_file(tmp_path / RESUME_FILE)
    # The save before it is still there, and resuming falls back to it, saying so.
    trainer = _trainer(tmp_path, steps=4)
    with pytest.warns(UserWarning, match=r"resuming from resume.prev.pt \(outer step 0\)"):
        trainer.resume()
    assert trainer.step == 0
    damage(tmp_path / "resume.prev.pt")
    with pytest.raises(ResumeError, match=r"resume"):
        _trainer(tmp_path, steps=4).resume()
    assert issubclass(ResumeError, CheckpointError)


def test_resume_file_refuses_pickled_code(tmp_path):
    path = tmp_path / RESUME_FILE
    torch.save({"step": 1, "evil": ToyLOpt()}, path)  # an arbitrary object needs unpickling
    with pytest.raises(ResumeError, match="corrupted or not an l2o resume file"):
        load_resume_file(path)


def test_resume_from_another_lopt_is_refused(tmp_path):
    _trainer(tmp_path, steps=1).train()
    state = load_resume_file(tmp_path / RESUME_FILE)
    state["meta_params"]["b"] = torch.zeros(5)
    save_resume_file(state, tmp_path / RESUME_FILE)
    with pytest.raises(ResumeError, match="'b' has shape"):
        _trainer(tmp_path, steps=2).resume()


def test_missing_resume_file_says_so(tmp_path):
    with pytest.raises(ResumeError, match="no resume file"):
        _trainer(tmp_path, steps=2).resume()


def test_interrupted_save_leaves_the_previous_resume_file_intact(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, steps=2)
    trainer.train()
    good = (tmp_path / RESUME_FILE).read_bytes()

    real_save = torch.save

    def killed_mid_write(obj, f):
        real_save(obj, f)
        f.truncate(100)  # half a file on disk, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    trainer.outer_steps = 3
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (tmp_path / RESUME_FILE).read_bytes() == good
    assert not list(tmp_path.glob("*.tmp"))


# --- with the real learned optimizer, estimators and task families ----------------------------


def _meta_train_and_evaluate(family, seed):
    from l2o.eval.episodes import evaluate
    from l2o.learned import get_lopt
    from l2o.meta.estimators import get_estimator
    from l2o.optim.registry import get

    lopt = get_lopt("mlp", hidden_sizes=[8])
    estimator = get_estimator(
        "tbptt", lopt=lopt, task=family, population=4, truncation=5, horizon=20, meta_loss="log"
    )
    trainer = MetaTrainer(
        lopt, estimator, get("adam", lr=1e-2), outer_steps=30, seed=seed, meta_grad_clip=1.0
    )
    held_out = dict(seeds=list(range(10**9, 10**9 + 4)), horizon=20, meta_loss="log")
    before = evaluate(lopt, trainer.meta_params, family, **held_out)
    result = trainer.train()
    after = evaluate(lopt, result.meta_params, family, **held_out)
    return before, after


@pytest.mark.parametrize("seed", [0, 1])
def test_short_meta_training_lowers_held_out_meta_loss_on_quadratics(seed):
    from l2o.tasks.families import get_family

    family = get_family("quadratic", dim=(4, 8), cond=(1.0, 30.0))
    before, after = _meta_train_and_evaluate(family, seed)
    assert after < before - 0.1, (before, after)


@pytest.mark.parametrize("seed", [0, 1])
def test_short_meta_training_lowers_held_out_meta_loss_on_mlp_classifiers(seed):
    from l2o.tasks.families import get_family

    family = get_family(
        "mlp",
        datasets=["digits"],
        width=(8, 16),
        depth=(1, 1),
        activations=["relu"],
        batch_size=(32, 32),
    )
    before, after = _meta_train_and_evaluate(family, seed)
    assert after < before - 0.2, (before, after)


def test_evaluate_is_deterministic_and_rejects_empty_seeds():
    from l2o.eval.episodes import evaluate
    from l2o.learned import get_lopt
    from l2o.tasks.registry import get_task

    lopt = get_lopt("mlp", hidden_sizes=[4])
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    task = get_task("quadratic", dim=3)
    first = evaluate(lopt, meta, task, seeds=[1, 2], horizon=3)
    assert first == evaluate(lopt, meta, task, seeds=[1, 2], horizon=3)
    assert first != evaluate(lopt, meta, task, seeds=[3, 4], horizon=3)
    with pytest.raises(ValueError, match="at least one seed"):
        evaluate(lopt, meta, task, seeds=[], horizon=3)


# --- data parallel over the population (torch.distributed, gloo, 2 processes) -----------------


def _distributed_worker(rank, world_size, port, out_dir):
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from l2o.learned import get_lopt
    from l2o.meta.distributed import all_reduce_mean, init_from_env, shard_size
    from l2o.meta.estimators import get_estimator
    from l2o.optim.registry import get
    from l2o.tasks.registry import get_task

    world = init_from_env("cpu")
    try:
        lopt = get_lopt("mlp", hidden_sizes=[4])
        task = get_task("quadratic", dim=3, cond=10.0)
        estimator = get_estimator(
            "tbptt",
            lopt=lopt,
            task=task,
            population=shard_size(4, world),
            truncation=3,
            horizon=6,
        )
        trainer = MetaTrainer(
            lopt,
            estimator,
            get("adam", lr=1e-2),
            outer_steps=3,
            seed=0,
            run_dir=out_dir / "run",
            world=world,
        )
        # The first estimate, averaged over ranks, as the trainer's first step will compute it.
        state = trainer.estimator_state
        local = estimator.estimate(trainer.meta_params, state, torch.Generator().manual_seed(9))
        averaged = all_reduce_mean(local.grads, world)
        result = trainer.train()
        torch.save(
            {
                "carry": state["carry"],
                "grads": averaged,
                "initial_meta_params": trainer.lopt.init_meta(torch.Generator().manual_seed(0)),
                "final_meta_params": result.meta_params,
            },
            out_dir / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _concat(trees):
    first = trees[0]
    if isinstance(first, dict):
        return {k: _concat([t[k] for t in trees]) for k in first}
    return torch.cat(trees)


@pytest.mark.slow  # two spawned interpreters: ~16 s on a loaded 2-core machine
def test_two_rank_gloo_run_averages_the_population_gradient_and_stays_in_sync(tmp_path):
    import torch.multiprocessing as mp

    from l2o.learned import get_lopt
    from l2o.meta.estimators import get_estimator
    from l2o.tasks.registry import get_task

    mp.spawn(_distributed_worker, args=(2, _free_port(), tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Both ranks applied the same updates.
    for k, v in ranks[0]["final_meta_params"].items():
        assert torch.equal(v, ranks[1]["final_meta_params"][k]), k
    # Each rank wrote its own share of the inner state; rank 0 the learned optimizer.
    assert (tmp_path / "run" / "resume.pt").is_file()
    assert (tmp_path / "run" / "resume.rank1.pt").is_file()
    assert (tmp_path / "run" / "checkpoints" / "last.json").is_file()

    # One process over the union of both ranks' members gives the same meta-gradient.
    lopt = get_lopt("mlp", hidden_sizes=[4])
    task = get_task("quadratic", dim=3, cond=10.0)
    single = get_estimator("tbptt", lopt=lopt, task=task, population=4, truncation=3, horizon=6)
    meta = ranks[0]["initial_meta_params"]
    state = single.init(meta, torch.Generator().manual_seed(0))
    state["carry"] = _concat([r["carry"] for r in ranks])
    full = single.estimate(meta, state, torch.Generator().manual_seed(9)).grads
    for k, g in full.items():
        torch.testing.assert_close(ranks[0]["grads"][k], g, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ranks[1]["grads"][k], g, rtol=1e-5, atol=1e-8)
    # The ranks saw different tasks instances: their local shares are not copies of each other.
    assert not torch.equal(ranks[0]["carry"]["seeds"], ranks[1]["carry"]["seeds"])


def test_population_must_split_evenly_over_ranks():
    from l2o.meta.distributed import World, all_reduce_mean, shard_size

    assert shard_size(8, World(rank=1, size=4)) == 2
    with pytest.raises(ValueError, match=r"estimator\.population=6 does not split evenly over 4"):
        shard_size(6, World(rank=0, size=4))
    grads = {"a": torch.ones(2)}
    assert all_reduce_mean(grads, World()) is grads  # one process: nothing to average


def test_git_commit_is_asked_once_and_marks_uncommitted_changes(monkeypatch):
    import subprocess

    from l2o import provenance

    answers = {"rev-parse": "abc123\n", "status": " M l2o/guard.py\n"}
    calls = []

    def fake_run(args, **kwargs):
        calls.append(args[1])
        return subprocess.CompletedProcess(args, 0, stdout=answers[args[1]], stderr="")

    monkeypatch.setattr(provenance.subprocess, "run", fake_run)
    provenance.git_commit.cache_clear()
    try:
        assert provenance.git_commit() == "abc123-dirty"
        answers["rev-parse"] = "def456\n"  # a commit made while the run goes on
        assert provenance.git_commit() == "abc123-dirty"
        assert calls == ["rev-parse", "status"]
        provenance.git_commit.cache_clear()
        answers["status"] = ""
        assert provenance.git_commit() == "def456"
    finally:
        provenance.git_commit.cache_clear()
