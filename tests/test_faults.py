"""Fault injection: every way a user (or a crash) can break a run, and what l2o does about it.

Each test injects one fault from issue #13 (a bad gradient, a raising closure, a kill at a write
point, a flipped bit, a hostile file, ...) and checks that nothing is lost or silently wrong.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import vmap

import l2o
from l2o.guard import GuardRule
from l2o.optim import get as get_rule
from l2o.optim.base import apply_updates


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)


def _closure(opt, model, x, y, *, poison=None):
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if poison is not None:
            poison(model)
        return loss

    return closure


def _all_state_finite(opt) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


# --- the guarded optimizer --------------------------------------------------------------------


def test_guard_with_an_sgd_fallback_steps_and_round_trips_its_state():
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(
        model.parameters(), fallback="sgd", fallback_kwargs={"lr": 0.05}
    )
    losses = [float(opt.step(_closure(opt, model, x, y)).detach()) for _ in range(10)]
    stats = opt.guard_stats
    assert stats["learned_steps"] + stats["fallback_steps"] == 10
    assert losses[-1] < losses[0]
    again = l2o.GuardedLearnedOptimizer(
        model.parameters(), fallback="sgd", fallback_kwargs={"lr": 0.05}
    )
    again.load_state_dict(opt.state_dict())
    assert again.guard_stats == stats


def test_one_inf_gradient_entry_resets_the_state_instead_of_poisoning_it():
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(model.parameters())

    def inf_entry(m):
        m[0].weight.grad[0, 0] = float("inf")

    for _ in range(3):
        opt.step(_closure(opt, model, x, y))
    with pytest.warns(RuntimeWarning, match="non-finite optimizer state"):
        opt.step(_closure(opt, model, x, y, poison=inf_entry))
    assert _all_state_finite(opt)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    before = opt.guard_stats
    assert before["state_resets"] >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        for _ in range(5):
            opt.step(_closure(opt, model, x, y, poison=inf_entry if _ == 2 else None))
    after = opt.guard_stats
    taken = after["learned_steps"] + after["fallback_steps"]
    assert taken - (before["learned_steps"] + before["fallback_steps"]) >= 4  # training goes on
    assert _all_state_finite(opt)


@pytest.mark.parametrize(("fail_at_call", "deferred"), [(2, False), (3, False), (2, True)])
def test_a_closure_that_raises_mid_step_leaves_everything_as_before(fail_at_call, deferred):
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(model.parameters(), deferred=deferred)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    calls = {"n": 0}
    inner = _closure(opt, model, x, y)

    def flaky():
        calls["n"] += 1
        # 1: the step's own; 2, 3: the candidates (deferred: 2, the pending one)
        if calls["n"] == fail_at_call:
            raise RuntimeError("data loader died")
        return inner()

    with pytest.raises(RuntimeError, match="data loader died"):
        opt.step(flaky)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    opt.step(_closure(opt, model, x, y))  # and the optimizer still works


@pytest.mark.parametrize("returned", [None, "vector"])
def test_a_closure_that_does_not_return_one_loss_is_a_clear_error(returned):
    model, (x, y) = _model(), _data()
    opt = l2o.GuardedLearnedOptimizer(model.parameters())

    def closure():
        opt.zero_grad()
        losses = ((model(x) - y) ** 2).squeeze(1)
        losses.mean().backward()
        return None if returned is None else losses

    with pytest.raises(TypeError, match="must return the loss as one number"):
        opt.step(closure)


def test_complex_parameters_are_refused_with_a_clear_error():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"complex.*view_as_real"):
        l2o.LearnedOptimizer([z])
    with pytest.raises(TypeError, match="complex"):
        l2o.optim.Adam([z])


def test_loading_a_state_of_other_shapes_is_refused_and_keeps_the_current_state():
    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(7))
    small = l2o.optim.Adam([a])
    a.grad = torch.ones(1)
    small.step()
    big = l2o.optim.Adam([b])
    b.grad = torch.ones(7)
    big.step()
    before = big.state_dict()
    with pytest.raises(ValueError, match=r"float32\[1\].*float32\[7\]"):
        big.load_state_dict(small.state_dict())
    assert all(torch.equal(big.state[b][k], before["state"][0][k]) for k in before["state"][0])


def test_guard_with_compare_every_vmaps_and_matches_member_by_member():
    rule = GuardRule(
        learned=get_rule("adam", lr=0.3), fallback=get_rule("sgd", lr=0.1), compare_every=2
    )
    curvature = torch.tensor([[1.0, 10.0], [3.0, 0.5], [2.0, 2.0]])
    start = {"w": torch.tensor([[1.0, -1.0], [2.0, 0.5], [-1.0, 1.0]])}

    def member(params, h, state, step):
        loss_fn = lambda p: 0.5 * (h * p["w"] ** 2).sum()  # noqa: E731
        grads = {"w": h * params["w"]}
        updates, state = rule.update(grads, state, params, step=step, loss_fn=loss_fn)
        return apply_updates(params, updates), state

    params, state = start, vmap(rule.init)(start)
    for t in range(6):
        steps = torch.full((3,), t, dtype=torch.int64)
        params, state = vmap(member)(params, curvature, state, steps)
    for i in range(3):
        p, s = {"w": start["w"][i]}, rule.init({"w": start["w"][i]})
        for t in range(6):
            p, s = member(p, curvature[i], s, t)
        torch.testing.assert_close(params["w"][i], p["w"])
        assert int(state["comparisons"][i]) == int(s["comparisons"]) == 3


# --- meta-training: saving, killing, resuming ---------------------------------------------------

from test_trainer import NoisyQuadraticEstimator, ToyLOpt, _adam, _trainer  # noqa: E402

from l2o.learned.checkpoint import StaleCardWarning, load_checkpoint  # noqa: E402
from l2o.meta import resume as resume_io  # noqa: E402
from l2o.meta.trainer import (  # noqa: E402
    MetaTrainingInterrupted,
    ResumeError,
    load_resume_file,
    save_resume_file,
)


def _final_params(tmp_path, steps=6, **kw):
    return _trainer(tmp_path, steps=steps, **kw).train().meta_params


def test_a_non_finite_step_on_a_checkpoint_step_still_saves_and_resumes(tmp_path):
    import json

    trainer = _trainer(tmp_path, steps=4, nan_at={1}, checkpoint_every=2)
    trainer.train()  # step 2 (call 1) is non-finite and is a checkpoint step
    card = json.loads((tmp_path / "checkpoints" / "step_000002.json").read_text())
    assert card["final_metrics"]["meta_grad_norm"] is None
    assert "final_metrics.meta_grad_norm" in card["non_finite"]
    resumed = _trainer(tmp_path, steps=5, nan_at={1})
    resumed.resume()
    assert resumed.step == 4 and resumed.skipped_nonfinite == 1
    resumed.train()


def test_a_kill_at_any_write_point_of_a_save_loses_nothing(tmp_path, monkeypatch):
    import os as os_module

    from l2o.learned import registry

    registry.register_lopt("toy", ToyLOpt)  # so that its checkpoints load
    try:
        _kill_at_every_write_point(tmp_path, monkeypatch, os_module)
    finally:
        registry._REGISTRY.unregister("toy")


def _kill_at_every_write_point(tmp_path, monkeypatch, os_module):

    want = _final_params(tmp_path / "whole", checkpoint_every=2)
    real_replace = os_module.replace
    # Writes of the first saves: a save at step 0 (1 resume file) and at step 2 (step_000002 pair,
    # last pair, a link rotation, the resume file): 6 renames. Kill at each of them in turn.
    for kill_at in range(1, 8):
        run_dir = tmp_path / f"kill{kill_at}"
        calls = {"n": 0}

        def killed(src, dst, *, _at=kill_at, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == _at:
                raise KeyboardInterrupt(f"killed at rename {_at}")
            return real_replace(src, dst)

        monkeypatch.setattr(os_module, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            _trainer(run_dir, steps=6, checkpoint_every=2).train()
        monkeypatch.setattr(os_module, "replace", real_replace)

        resumed = _trainer(run_dir, steps=6, checkpoint_every=2)
        if any(run_dir.glob("resume*.pt")):  # killed at the very first write: nothing to resume
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a fallback to resume.prev.pt is announced
                resumed.resume()
        got = resumed.train().meta_params
        assert all(torch.equal(got[k], want[k]) for k in want), kill_at
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StaleCardWarning)
            load_checkpoint(run_dir / "checkpoints" / "last")
        assert not list(run_dir.rglob("*.tmp")), kill_at


def test_one_flipped_bit_in_a_resume_file_is_caught_and_the_previous_save_used(tmp_path):
    _trainer(tmp_path, steps=4, checkpoint_every=2).train()
    path = tmp_path / resume_io.RESUME_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"integrity|corrupted"):
        load_resume_file(path)
    trainer = _trainer(tmp_path, steps=4)
    with pytest.warns(UserWarning, match=r"resuming from resume.prev.pt \(outer step 2\)"):
        trainer.resume()
    assert trainer.step == 2


def test_a_rank_killed_while_saving_leaves_the_previous_complete_set(tmp_path, monkeypatch):
    for step in (5,):
        for rank in (0, 1):
            resume_io.rotate_and_save({"step": step}, tmp_path, rank)
    resume_io.rotate_and_save({"step": 10}, tmp_path, rank=1)  # rank 1 saved step 10 ...

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resume_io.durable, "write_with", dies)  # ... rank 0 died saving it
    with pytest.raises(KeyboardInterrupt):
        resume_io.rotate_and_save({"step": 10}, tmp_path, rank=0)
    steps = [sorted(resume_io.readable_steps(tmp_path, r)) for r in (0, 1)]
    assert steps == [[5], [5, 10]]
    assert resume_io.complete_step(steps) == 5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("step", "abc", "step must be an integer"),
        ("step", 10**6, "do not add up to the outer steps"),
        ("applied_updates", 1, "do not add up to the outer steps"),
        ("history", {"a": 1}, "history must be a list"),
        ("wall_time", "now", "wall_time must be a number"),
        ("generator_state", torch.zeros(3, dtype=torch.uint8), "generator_state is not"),
        ("outer_state", {"mu": {}}, "outer_state holds"),
        ("estimator_state", {"x": torch.zeros(1)}, "estimator_state holds"),
    ],
)
def test_crafted_resume_fields_are_refused_with_a_clear_error(tmp_path, field, value, message):
    _trainer(tmp_path, steps=2).train()
    state = load_resume_file(tmp_path / resume_io.RESUME_FILE)
    state[field] = value
    save_resume_file(state, tmp_path / resume_io.RESUME_FILE)  # a valid hash over crafted data
    with pytest.raises(ResumeError, match=message):
        _trainer(tmp_path, steps=4).resume(tmp_path / resume_io.RESUME_FILE)


class _SignalAt(NoisyQuadraticEstimator):
    def __init__(self, call: int, signum: int):
        super().__init__()
        self.call, self.signum = call, signum

    def estimate(self, meta_params, state, generator):
        import os

        if int(state["calls"]) == self.call:
            os.kill(os.getpid(), self.signum)
        return super().estimate(meta_params, state, generator)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_finish_the_step_save_and_resume_exactly(tmp_path, signame):
    import signal

    from l2o.meta.trainer import MetaTrainer

    want = _final_params(tmp_path / "whole", steps=6)
    trainer = MetaTrainer(
        ToyLOpt(), _SignalAt(2, getattr(signal, signame)), _adam(),
        outer_steps=6, seed=3, run_dir=tmp_path / "cut",
    )  # fmt: skip
    with pytest.raises(MetaTrainingInterrupted, match=f"{signame} after outer step 3"):
        trainer.train()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = _trainer(tmp_path / "cut", steps=6)
    resumed.resume()
    assert resumed.step == 3
    got = resumed.train().meta_params
    assert all(torch.equal(got[k], want[k]) for k in want)


# --- the command line -----------------------------------------------------------------------------

from test_cli_meta_train import _cfg, _cli  # noqa: E402

from l2o.cli.meta_train import run  # noqa: E402


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigterm_saves_and_the_printed_resume_command_continues_the_run(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    args = ["experiment=smoke", "estimator=es", f"run_dir={run_dir}", "outer_steps=1000000"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    script = "from l2o.cli.meta_train import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = run_dir / "meta_train.log"
    deadline = time.time() + 120
    while not (log.is_file() and (run_dir / "resume.pt").is_file()) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # some outer steps
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    resume_line = stderr.strip().splitlines()[-1]
    assert f"Resume with: l2o-meta-train run_dir={run_dir} resume=true" in resume_line
    step = load_resume_file(run_dir / "resume.pt")["step"]
    assert step > 0
    # README's resume line: the run's own config (estimator=es) comes back from its resume file.
    done = _cli(f"run_dir={run_dir}", "resume=true", f"outer_steps={step + 2}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    card = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert card["provenance"]["outer_step"] == step + 2
    assert card["config"]["estimator"]["_target_"] == "l2o.meta.estimators.ES"


def test_a_refused_command_changes_nothing_and_creates_nothing(tmp_path):
    first = _cli("experiment=smoke", "run_dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = _snapshot(tmp_path)
    for args in (
        ["experiment=smoke", "run_dir=run"],  # a finished run is never clobbered
        ["experiment=smoke", "run_dir=other", "estimator=foo"],  # unknown group choice
        ["experiment=smoke", "run_dir=other", "seed=-3"],
    ):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("l2o-meta-train: error: "), proc.stderr
    assert "estimator" in _cli("run_dir=x", "estimator=foo", cwd=tmp_path).stderr
    assert _snapshot(tmp_path) == before


def test_overwrite_removes_the_runs_own_files_only(tmp_path):
    run(_cfg(tmp_path, "eval.seeds=0"))
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "checkpoints" / "best.json").write_text("{}")
    result = run(_cfg(tmp_path, "outer_steps=1", "eval.seeds=0", "overwrite=true"))
    assert len(result["history"]) == 1
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "checkpoints" / "best.json").is_file()
    assert not (run_dir / "checkpoints" / "step_000002.json").exists()  # the old run's


def test_the_last_checkpoint_carries_the_held_out_result_a_markdown_card_and_a_plot(tmp_path):
    import json

    result = run(_cfg(tmp_path))
    last = tmp_path / "run" / "checkpoints" / "last"
    card = json.loads(last.with_suffix(".json").read_text())
    assert card["eval"]["before"] == pytest.approx(result["eval_before"])
    assert card["eval"]["after"] == pytest.approx(result["eval_after"])
    markdown = last.with_suffix(".md").read_text()
    assert card["id"] in markdown and "Held-out result" in markdown
    assert last.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(last)[2]["id"] == card["id"]


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    run(_cfg(tmp_path, "wandb.mode=offline", "outer_steps=2", "eval.seeds=0"))
    run(_cfg(tmp_path, "wandb.mode=offline", "outer_steps=3", "eval.seeds=0", "resume=true"))
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    ids = {p.name.split("-")[3] for p in runs}
    assert len(ids) == 1, runs  # one W&B run id, continued


def test_held_out_evaluation_shows_its_progress(capsys):
    from l2o.eval.episodes import evaluate
    from l2o.learned import get_lopt
    from l2o.tasks.families import get_family

    lopt = get_lopt("mlp", hidden_sizes=[4])
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    family = get_family("quadratic", dim=(2, 3), cond=(1.0, 2.0))
    evaluate(lopt, meta, family, seeds=[1, 2, 3], horizon=2, progress="held-out")
    err = capsys.readouterr().err
    assert "held-out" in err and "3/3" in err


# --- found in review: each failed before its fix ------------------------------------------------


def test_a_save_after_falling_back_to_prev_never_replaces_the_only_good_save(tmp_path, monkeypatch):
    _trainer(tmp_path, steps=2, checkpoint_every=1).train()  # saves at steps 0, 1, 2
    newest = tmp_path / resume_io.RESUME_FILE
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01  # the newest save is damaged
    newest.write_bytes(bytes(data))
    trainer = _trainer(tmp_path, steps=4, checkpoint_every=1)
    with pytest.warns(UserWarning, match="resuming from resume.prev.pt"):
        trainer.resume()

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(resume_io.durable, "write_with", dies)  # killed during its first save
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.undo()
    assert sorted(resume_io.readable_steps(tmp_path)) == [1]  # the good save is still there


def test_the_guard_vmaps_with_an_int_step():
    rule = GuardRule(learned=get_rule("adam", lr=0.1), fallback=get_rule("sgd", lr=0.1))
    params = {"w": torch.randn(3, 2)}
    grads = {"w": torch.randn(3, 2)}

    def member(g, s, p):
        return rule.update(g, s, p, step=0, loss_fn=lambda q: (q["w"] ** 2).sum())

    updates, _ = vmap(member)(grads, vmap(rule.init)(params), params)
    assert updates["w"].shape == (3, 2) and bool(torch.isfinite(updates["w"]).all())


def test_updating_a_stale_card_leaves_a_loadable_checkpoint(tmp_path):
    from l2o.learned import LSTMLOpt, save_checkpoint
    from l2o.learned.checkpoint import update_card

    lopt = LSTMLOpt(hidden_size=3)
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "ck", lopt, meta)
    old_card = (tmp_path / "ck.json").read_bytes()
    newer = {k: v + 1 for k, v in meta.items()}
    save_checkpoint(tmp_path / "ck", lopt, newer)
    (tmp_path / "ck.json").write_bytes(old_card)  # killed between the two writes
    with pytest.warns(StaleCardWarning):
        update_card(tmp_path / "ck", {"eval": {"after": 1.0}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt card is consistent: no warning
        _, loaded, card = load_checkpoint(tmp_path / "ck")
    assert card["eval"] == {"after": 1.0} and all(torch.equal(loaded[k], newer[k]) for k in newer)


@pytest.mark.parametrize("name", ["tbptt", "es", "pes"])
def test_when_every_member_diverges_the_estimate_is_non_finite_and_skipped(name):
    from _meta_fixtures import MomentumLOpt, Quadratic

    from l2o.meta.estimators import get_estimator

    lopt = MomentumLOpt(lr=1e30)
    est = get_estimator(name, lopt=lopt, task=Quadratic(), population=2, truncation=20, horizon=40)
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    result = est.estimate(meta, est.init(meta, g), g)
    assert not all(bool(torch.isfinite(v).all()) for v in result.grads.values())


def test_a_signal_during_the_last_outer_step_finishes_the_run_normally(tmp_path):
    import signal

    from l2o.meta.trainer import MetaTrainer

    trainer = MetaTrainer(
        ToyLOpt(), _SignalAt(2, signal.SIGTERM), _adam(), outer_steps=3, seed=3, run_dir=tmp_path
    )
    result = trainer.train()  # the signal comes during step 3 of 3: nothing left to resume
    assert len(result.history) == 3


def test_resume_from_a_path_continues_in_that_run_and_never_into_another(tmp_path):
    from l2o.meta.configure import ConfigError

    run(_cfg(tmp_path / "a", "outer_steps=2", "eval.seeds=0"))
    run(_cfg(tmp_path / "b", "outer_steps=2", "eval.seeds=0"))
    source = tmp_path / "a" / "run"
    other = _snapshot(tmp_path / "b")
    with pytest.raises(ConfigError, match="already holds a run"):
        command = [f"resume={source}", f"run_dir={tmp_path / 'b' / 'run'}", "outer_steps=3"]
        run(_cfg(tmp_path / "b", "outer_steps=3", f"resume={source}"), command)
    assert _snapshot(tmp_path / "b") == other
    # Without run_dir on the command line, resume=<path> continues the run where it is.
    command = [f"resume={source}", "outer_steps=3"]
    done = run(_cfg(tmp_path / "c", "outer_steps=3", f"resume={source}"), command)
    assert done["run_dir"] == source and len(done["history"]) == 3


def test_eval_first_seed_is_checked_before_any_work(tmp_path):
    from l2o.meta.configure import ConfigError

    with pytest.raises(ConfigError, match=r"^eval\.first_seed: must be an integer"):
        run(_cfg(tmp_path, "eval.first_seed=abc"))
