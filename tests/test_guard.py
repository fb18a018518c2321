"""LGL2O guard (l2o.guard): the rule, and the drop-in torch.optim classes."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import l2o
from l2o.guard import GuardedLearnedOptimizer, GuardRule, _all_finite, guard_stats
from l2o.learned import MLPLOpt, save_checkpoint
from l2o.learned.checkpoint import CheckpointError
from l2o.learned.optimizer import LearnedOptimizer
from l2o.optim import get
from l2o.optim.base import FunctionalLoss, UpdateRule, apply_updates


def quadratic(seed: int, dim: int = 6, cond: float = 20.0):
    """f(x) = 0.5 xᵀAx - bᵀx with eigenvalues in [1, cond]: strongly convex, L = cond."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), dim, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    b = torch.randn(dim, generator=g, dtype=torch.float64)
    x0 = {"x": torch.randn(dim, generator=g, dtype=torch.float64) * 3}

    def loss(p):
        x = p["x"]
        return 0.5 * x @ a @ x - b @ x

    minimum = loss({"x": torch.linalg.solve(a, b)})
    return loss, x0, minimum, cond


@dataclasses.dataclass(frozen=True)
class ScaledSignRule(UpdateRule):
    """A deliberately bad 'learned' rule: fixed-size sign steps (never converges exactly)."""

    lr: float = 0.5

    def init(self, params):
        return {}

    def update(self, grads, state, params, *, step, loss_fn=None):
        return {k: -self.lr * torch.sign(g) for k, g in grads.items()}, state


@dataclasses.dataclass(frozen=True)
class FaultyRule(UpdateRule):
    """Returns NaN/Inf updates on chosen steps (fault injection)."""

    bad_steps: tuple = (0, 3, 4)

    def init(self, params):
        return {"count": torch.zeros((), dtype=torch.int64)}

    def update(self, grads, state, params, *, step, loss_fn=None):
        bad = int(step) in self.bad_steps
        fill = float("nan") if int(step) % 2 == 0 else float("inf")
        ups = {k: torch.full_like(g, fill) if bad else -0.01 * g for k, g in grads.items()}
        return ups, {"count": state["count"] + 1}


@pytest.mark.parametrize("seed", range(5))
def test_guard_never_worse_than_better_candidate_and_converges_on_strongly_convex_quadratics(seed):
    loss, params, minimum, lipschitz = quadratic(seed)
    learned, fallback = ScaledSignRule(lr=0.3), get("sgd", lr=1.0 / lipschitz)
    guard = GuardRule(learned=learned, fallback=fallback)
    state = guard.init(params)
    for step in range(300):
        grads = torch.func.grad(loss)(params)
        # The two candidates, from the guard's own (always advancing) inner states.
        u_l, _ = learned.update(grads, state["learned"], params, step=step)
        u_f, _ = fallback.update(grads, state["fallback"], params, step=step)
        best = min(loss(apply_updates(params, u_l)), loss(apply_updates(params, u_f)))
        updates, state = guard.update(grads, state, params, step=step, loss_fn=loss)
        params = apply_updates(params, updates)
        assert loss(params) <= best + 1e-12
    assert float(loss(params) - minimum) < 1e-8  # SGD with lr=1/L converges; so does the guard
    stats = guard_stats(state)
    assert stats["learned_steps"] > 0 and stats["fallback_steps"] > 0
    assert stats["learned_steps"] + stats["fallback_steps"] == 300


def test_nonfinite_learned_updates_never_reach_parameters():
    loss, params, _, lipschitz = quadratic(0)
    guard = GuardRule(learned=FaultyRule(), fallback=get("sgd", lr=1.0 / lipschitz))
    state = guard.init(params)
    for step in range(8):
        grads = torch.func.grad(loss)(params)
        updates, state = guard.update(grads, state, params, step=step, loss_fn=loss)
        params = apply_updates(params, updates)
        assert torch.isfinite(params["x"]).all()
    stats = guard_stats(state)
    assert stats["fallback_steps"] >= 3  # every faulty step fell back
    assert int(state["learned"]["count"]) == 8  # the learned state advanced every step


def test_nonfinite_fallback_and_learned_take_no_step():
    loss, params, _, _ = quadratic(1)
    guard = GuardRule(learned=FaultyRule(bad_steps=(0,)), fallback=FaultyRule(bad_steps=(0,)))
    state = guard.init(params)
    grads = torch.func.grad(loss)(params)
    updates, state = guard.update(grads, state, params, step=0, loss_fn=loss)
    assert torch.equal(updates["x"], torch.zeros_like(params["x"]))
    assert guard_stats(state)["skipped_steps"] == 1


def test_compare_every_reuses_the_last_winner_and_counts_comparisons():
    loss, params, _, lipschitz = quadratic(2)
    guard = GuardRule(
        learned=ScaledSignRule(lr=0.3), fallback=get("sgd", lr=1 / lipschitz), compare_every=4
    )
    state = guard.init(params)
    evaluations = 0

    def counted(p):
        nonlocal evaluations
        evaluations += 1
        return loss(p)

    for step in range(12):
        grads = torch.func.grad(loss)(params)
        updates, state = guard.update(grads, state, params, step=step, loss_fn=counted)
        params = apply_updates(params, updates)
    assert guard_stats(state)["comparisons"] == 3
    assert evaluations == 6  # two per comparison, none in between


def test_guard_rule_requires_loss_fn():
    loss, params, _, _ = quadratic(0)
    guard = GuardRule(learned=ScaledSignRule(), fallback=get("sgd", lr=0.01))
    with pytest.raises(ValueError, match="closure"):
        guard.update(torch.func.grad(loss)(params), guard.init(params), params, step=0)


def test_guard_rule_vmaps_over_a_population_like_a_loop():
    tasks = [quadratic(s) for s in range(4)]
    guard = GuardRule(learned=ScaledSignRule(lr=0.2), fallback=get("sgd", lr=0.05))
    stacked_a = torch.stack([t[1]["x"] for t in tasks])

    # Python loop
    loop = []
    for loss, params, _, _ in tasks:
        state = guard.init(params)
        for step in range(5):
            grads = torch.func.grad(loss)(params)
            updates, state = guard.update(grads, state, params, step=step, loss_fn=loss)
            params = apply_updates(params, updates)
        loop.append(params["x"])

    # vmapped over a population of quadratics delivered as data
    mats = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
        eig = torch.logspace(0, math.log10(20.0), 6, dtype=torch.float64)
        mats.append((q @ torch.diag(eig) @ q.T, torch.randn(6, generator=g, dtype=torch.float64)))
    a = torch.stack([m[0] for m in mats])
    b = torch.stack([m[1] for m in mats])

    def run(x, a, b):
        def loss(p):
            return 0.5 * p["x"] @ a @ p["x"] - b @ p["x"]

        params = {"x": x}
        state = guard.init(params)
        for step in range(5):
            grads = torch.func.grad(loss)(params)
            updates, state = guard.update(grads, state, params, step=step, loss_fn=loss)
            params = apply_updates(params, updates)
        return params["x"]

    vmapped = torch.func.vmap(run)(stacked_a, a, b)
    torch.testing.assert_close(vmapped, torch.stack(loop), rtol=1e-12, atol=1e-12)


# --- drop-in classes ------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    lopt = MLPLOpt(hidden_sizes=(8,))
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    save_checkpoint(tmp_path / "lopt", lopt, meta)
    return tmp_path / "lopt"


@pytest.fixture
def other_checkpoint(tmp_path):
    lopt = MLPLOpt(hidden_sizes=(8,))
    meta = lopt.init_meta(torch.Generator().manual_seed(1))
    save_checkpoint(tmp_path / "other", lopt, meta)
    return tmp_path / "other"


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(64, 5)
    y = torch.randint(0, 3, (64,))
    return model, x, y


def _train(model, opt, x, y, steps, scheduler=None, closure_required=True):
    losses = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        losses.append(float(loss.detach()))
        if scheduler is not None:
            scheduler.step()
    return losses


def _make(kind, model, checkpoint, **kw):
    if kind == "learned":
        return LearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=kw.get("lr", 30.0))
    return GuardedLearnedOptimizer(
        model.parameters(),
        checkpoint=checkpoint,
        fallback="adam",
        lr=kw.get("lr", 30.0),
        deferred=kind == "deferred",
    )


@pytest.mark.parametrize("kind", ["learned", "guarded"])
def test_dropin_classes_train_an_ordinary_module_with_a_scheduler(kind, checkpoint):
    model, x, y = _model_and_data()
    opt = _make(kind, model, checkpoint)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    losses = _train(model, opt, x, y, 30, sched)
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(30.0 * 0.5**3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["learned", "guarded", "deferred"])
def test_dropin_state_dict_mid_run_continues_identically(kind, checkpoint, tmp_path):
    model, x, y = _model_and_data()
    opt = _make(kind, model, checkpoint)
    _train(model, opt, x, y, 5)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "s.pt")
    reference = _train(model, opt, x, y, 5)

    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    model2, _, _ = _model_and_data(seed=123)
    model2.load_state_dict(saved["model"])
    opt2 = _make(kind, model2, checkpoint)
    opt2.load_state_dict(saved["opt"])
    assert _train(model2, opt2, x, y, 5) == reference
    if kind != "learned":
        assert opt2.guard_stats == opt.guard_stats


@pytest.mark.parametrize("kind", ["learned", "guarded"])
def test_dropin_state_from_another_checkpoint_is_refused(kind, checkpoint, other_checkpoint):
    model, x, y = _model_and_data()
    opt = _make(kind, model, checkpoint)
    _train(model, opt, x, y, 2)
    other = _make(kind, model, other_checkpoint)
    with pytest.raises(ValueError, match="saved by"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("kind", ["learned", "guarded"])
def test_state_saved_with_the_previous_default_names_where_it_is_shipped(kind):
    """The default moved from mlp_2x32 to ortho_mlp: a state saved with the old default is
    refused by the new one with the name that loads it, and loads under that name."""
    model, x, y = _model_and_data()
    old = _make(kind, model, "mlp_2x32")
    _train(model, old, x, y, 2)
    saved = old.state_dict()
    with pytest.raises(ValueError, match=r"shipped as checkpoint='mlp_2x32'"):
        _make(kind, model, "default").load_state_dict(saved)
    _make(kind, model, "mlp_2x32").load_state_dict(saved)


def test_guarded_state_with_another_fallback_is_refused(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, fallback="adam")
    _train(model, opt, x, y, 2)
    other = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, fallback="sgd")
    with pytest.raises(ValueError, match="saved by"):
        other.load_state_dict(opt.state_dict())


def test_guarded_step_without_closure_explains_the_fix(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_learned_optimizer_steps_without_closure(checkpoint):
    model, x, y = _model_and_data()
    opt = LearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=30.0)
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_guard_stats_count_both_sides_and_accept_rate(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=30.0)
    assert opt.guard_stats["learned_steps"] == 0
    _train(model, opt, x, y, 10)
    stats = opt.guard_stats
    assert stats["learned_steps"] + stats["fallback_steps"] == 10
    assert stats["comparisons"] == 10
    assert stats["accept_rate"] == pytest.approx(stats["learned_steps"] / 10)


def test_guard_closure_compares_on_the_supplied_batch(checkpoint):
    model, x, y = _model_and_data()
    x_val, y_val = torch.randn(32, 5), torch.randint(0, 3, (32,))
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=30.0)
    calls = {"train": 0, "val": 0}

    def closure():
        calls["train"] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def guard_closure():
        calls["val"] += 1
        assert not torch.is_grad_enabled()
        return nn.functional.cross_entropy(model(x_val), y_val)

    for _ in range(3):
        opt.step(closure, guard_closure=guard_closure)
    assert calls == {"train": 3, "val": 6}


def test_nan_learned_update_is_rejected_by_the_dropin_guard(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=1e38)
    _train(model, opt, x, y, 3)  # learned steps overflow to inf: the guard must refuse them
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.guard_stats["fallback_steps"] == 3


@pytest.mark.parametrize("make", ["learned", "guarded"])
def test_dropin_rejects_corrupted_checkpoints_without_running_code(make, checkpoint, tmp_path):
    model, _, _ = _model_and_data()
    tensors = checkpoint.with_suffix(".safetensors")
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        _make(make, model, checkpoint)
    with pytest.raises(CheckpointError, match="shipped"):
        _make(make, model, "no_such_shipped_checkpoint")


def test_top_level_exports():
    assert l2o.LearnedOptimizer is LearnedOptimizer
    assert l2o.GuardedLearnedOptimizer is GuardedLearnedOptimizer


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_guarded_optimizer_on_cuda(checkpoint, dtype):
    model, x, y = _model_and_data()
    model = model.to("cuda", dtype)
    x, y = x.to("cuda", dtype), y.to("cuda")
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=30.0)
    losses = _train(model, opt, x, y, 10)
    assert losses[-1] < losses[0]
    assert all(p.dtype == dtype and p.is_cuda for p in model.parameters())


# --- the shipped checkpoint -----------------------------------------------------------------


def test_guard_keeps_the_shipped_optimizer_convergent_far_beyond_its_meta_training_horizon():
    """The shipped mlp_2x32 learned optimizer (the default until 2026-12-02) saw 200-step
    episodes of MLP training. On the Rosenbrock function over 2000 steps, alone it gets close to
    the minimum and then diverges; guarded by plain SGD it keeps converging, and ends below where
    SGD alone gets."""
    from l2o.eval.runs import run_rule
    from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
    from l2o.tasks import get_task

    def training_curves(rule, task, seeds, steps):
        return run_rule(rule, task, seeds, steps).curves

    lopt, meta, _ = load_checkpoint(resolve_checkpoint("mlp_2x32"))
    learned = lopt.rule(meta)
    task = get_task("rosenbrock")  # minimum 0 at (1, 1)
    seeds = [2**31 + i for i in range(4)]
    steps = 2000
    fallback = get("sgd", lr=1e-3)
    alone = training_curves(learned, task, seeds, steps).mean(dim=1)
    guarded = training_curves(GuardRule(learned=learned, fallback=fallback), task, seeds, steps)
    guarded = guarded.mean(dim=1)
    sgd = training_curves(fallback, task, seeds, steps).mean(dim=1)

    assert float(alone[-1]) > 100 * float(alone.min())  # unguarded: diverging from the minimum
    assert float(alone[-1]) > 10.0
    assert float(guarded[-1]) < 1e-3  # guarded: converging to the minimum
    assert float(guarded[-1]) <= float(guarded[steps // 2])
    assert float(guarded[-1]) < float(sgd[-1])


def test_shipped_checkpoint_beats_tuned_adam_on_held_out_seeds_of_its_family(tmp_path):
    """checkpoints/mlp_2x32.md's claim, on 8 of its 32 held-out seeds: the unguarded learned
    optimizer reaches tuned Adam's final training loss in at most 60% of Adam's 200 steps (Adam
    tuned on the tuning seeds)."""
    from l2o.eval.cells import CellStore
    from l2o.eval.contenders import rule_contender
    from l2o.eval.evaluation import Settings, _tune
    from l2o.eval.metrics import smooth, steps_to_reach
    from l2o.eval.runs import run_rule
    from l2o.learned.checkpoint import load_checkpoint, resolve_checkpoint
    from l2o.meta.configure import build, compose_config
    from l2o.tasks.suites import HELD_OUT_SEED, SuiteEntry

    cfg = compose_config("experiment=mnist1d_mlp")
    task = build(cfg, torch.device("cpu"))["task"].sample(HELD_OUT_SEED)
    lopt, meta, _ = load_checkpoint(resolve_checkpoint("mlp_2x32"))
    seeds = tuple(HELD_OUT_SEED + i for i in range(8))
    entry = SuiteEntry("mnist1d_mlp", task, 200, seeds)
    settings = Settings(grid=(3e-3, 1e-2, 3e-2), tuning_seeds=4)
    tuned = _tune(rule_contender("adam"), entry, settings, CellStore(tmp_path))
    assert tuned["lr"] == 1e-2  # an interior optimum: the grid brackets Adam's best
    adam = run_rule(get("adam", lr=tuned["lr"]), task, seeds, 200).curves
    learned = run_rule(lopt.rule(meta), task, seeds, 200).curves
    adam_final = float(smooth(adam.mean(1, keepdim=True))[-1])
    reached = steps_to_reach(smooth(learned.mean(1, keepdim=True))[:, 0], adam_final)
    assert reached is not None and reached <= 0.6 * 200, reached


@pytest.mark.parametrize("cls", [LearnedOptimizer, GuardedLearnedOptimizer])
def test_shipped_default_checkpoint_trains_an_ordinary_module(cls):
    model, x, y = _model_and_data()
    opt = cls(model.parameters())  # checkpoint="default", an alias of ortho_long_mixture
    losses = _train(model, opt, x, y, 20)
    assert losses[-1] < 0.9 * losses[0]
    assert opt.state_dict()["l2o"]["checkpoint"].startswith("ortho_mlp-")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_guarded_optimizer_keeps_the_parameter_dtype(checkpoint, dtype):
    model, x, y = _model_and_data()
    model = model.to(dtype)
    x = x.to(dtype)
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=30.0)
    losses = []
    for _ in range(10):

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    assert losses[-1] < losses[0]
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())


# --- deferred comparisons (the cheaper guard) ------------------------------------------------


def deferred_run(loss, params, learned, fallback, steps, compare_every=1):
    """Run a deferred guard; yield (params, state, the previous fallback candidate)."""
    guard = GuardRule(
        learned=learned, fallback=fallback, deferred=True, compare_every=compare_every
    )
    state = guard.init(params)
    for step in range(steps):
        pending = dict(state["pending"]) if bool(state["has_pending"]) else None
        grads = torch.func.grad(loss)(params)
        updates, state = guard.update(grads, state, params, step=step, loss_fn=loss)
        yield guard, apply_updates(params, updates), state, pending, params
        params = apply_updates(params, updates)


@pytest.mark.parametrize("seed", range(3))
def test_deferred_guard_keeps_the_better_candidate_and_converges_on_strongly_convex_quadratics(
    seed,
):
    loss, params, minimum, lipschitz = quadratic(seed)
    learned, fallback = ScaledSignRule(lr=0.3), get("sgd", lr=1.0 / lipschitz)
    *_, (guard, final, state, _, _) = deferred_run(loss, params, learned, fallback, 300)
    assert bool(state["has_pending"])  # the last learned candidate awaits its comparison
    updates, state = guard.settle(state, final, loss)
    final = apply_updates(final, updates)
    assert float(loss(final) - minimum) < 1e-8  # SGD with lr=1/L converges; so does the guard
    stats = guard_stats(state)
    assert stats["learned_steps"] > 0 and stats["fallback_steps"] > 0
    assert stats["learned_steps"] + stats["fallback_steps"] == 300
    assert not bool(state["has_pending"])


def test_deferred_guard_step_starts_from_the_winner_with_the_winners_gradient():
    loss, params, _, lipschitz = quadratic(4)
    fallback = get("sgd", lr=1.0 / lipschitz)
    run = deferred_run(loss, params, ScaledSignRule(lr=0.3), fallback, 40)
    for _, after, state, pending, before in run:
        if pending is None:
            continue
        winner = before if loss(before) <= loss(pending) else pending
        # SGD's new candidate, kept pending, is the winner minus lr times the winner's gradient.
        grads = torch.func.grad(loss)(winner)
        expected = winner["x"] - grads["x"] / lipschitz
        if bool(state["has_pending"]):
            torch.testing.assert_close(state["pending"]["x"], expected)
        assert torch.isfinite(after["x"]).all()


def test_deferred_guard_never_lets_a_nonfinite_update_reach_the_parameters():
    loss, params, _, lipschitz = quadratic(0)
    fallback = get("sgd", lr=1.0 / lipschitz)
    *_, (_, final, state, _, _) = deferred_run(loss, params, FaultyRule(), fallback, 8)
    assert torch.isfinite(final["x"]).all()
    assert int(state["learned"]["count"]) == 8  # the learned state advanced every step
    assert guard_stats(state)["fallback_steps"] >= 3  # every faulty step fell back at once
    *_, (_, _, state, _, _) = deferred_run(
        loss, params, FaultyRule(bad_steps=(0,)), FaultyRule(bad_steps=(0,)), 1
    )
    assert guard_stats(state)["skipped_steps"] == 1


def test_deferred_guard_keeps_no_nonfinite_pending_candidate():
    loss, params, _, lipschitz = quadratic(0)
    learned, faulty = get("sgd", lr=1.0 / lipschitz), FaultyRule(bad_steps=(0, 1))
    for _, _, state, _, _ in deferred_run(loss, params, learned, faulty, 3):
        assert all(torch.isfinite(v).all() for v in state["pending"].values())


@pytest.mark.parametrize("compare_every", [1, 2])
def test_deferred_guard_vmaps_over_a_population_like_a_loop(compare_every):
    tasks = [quadratic(s) for s in range(3)]
    learned, fallback = ScaledSignRule(lr=0.2), get("sgd", lr=0.05)
    loop = [
        list(deferred_run(loss, p, learned, fallback, 6, compare_every))[-1][1]["x"]
        for loss, p, *_ in tasks
    ]
    guard = GuardRule(
        learned=learned, fallback=fallback, deferred=True, compare_every=compare_every
    )

    def run(x, a, b):
        def loss(p):
            return 0.5 * p["x"] @ a @ p["x"] - b @ p["x"]

        params, state = {"x": x}, guard.init({"x": x})
        for step in range(6):
            grads = torch.func.grad(loss)(params)
            updates, state = guard.update(
                grads, state, params, step=torch.tensor(step), loss_fn=loss
            )
            params = apply_updates(params, updates)
        return params["x"]

    a, b, x0 = [], [], []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
        eig = torch.logspace(0, math.log10(20.0), 6, dtype=torch.float64)
        a.append(q @ torch.diag(eig) @ q.T)
        b.append(torch.randn(6, generator=g, dtype=torch.float64))
        x0.append(tasks[seed][1]["x"])
    vmapped = torch.func.vmap(run)(torch.stack(x0), torch.stack(a), torch.stack(b))
    torch.testing.assert_close(vmapped, torch.stack(loop), rtol=1e-12, atol=1e-12)


def test_deferred_guard_with_compare_every_compares_every_nth_step_and_reuses_the_winner():
    loss, params, minimum, lipschitz = quadratic(3)
    evaluations = 0

    def counted(p):
        nonlocal evaluations
        evaluations += 1
        return loss(p)

    learned, fallback = ScaledSignRule(lr=0.3), get("sgd", lr=1.0 / lipschitz)
    sides_between = set()
    for step, (_, after, state, _, before) in enumerate(
        deferred_run(counted, params, learned, fallback, 298, compare_every=3)
    ):
        # A comparison is left pending on every third step only.
        assert bool(state["has_pending"]) == (step % 3 == 0)
        if step % 3 == 2:  # nothing to settle: the last winner's candidate, unchecked
            last = guard_stats(state)["last_choice"]
            side = learned if last == "learned" else fallback
            grads = torch.func.grad(loss)(before)
            update, _ = side.update(grads, side.init(before), before, step=step)
            torch.testing.assert_close(after["x"], before["x"] + update["x"])
            sides_between.add(last)
    assert sides_between == {"learned", "fallback"}
    # One evaluation per step for its gradient, and two (the tentative point and the pending
    # candidate) per decided comparison: none on the steps in between.
    stats = guard_stats(state)
    assert stats["comparisons"] == 99 and evaluations == 298 + 2 * 99
    assert stats["learned_steps"] + stats["fallback_steps"] == 297  # and one pending
    guard = GuardRule(learned=learned, fallback=fallback, deferred=True, compare_every=3)
    updates, state = guard.settle(state, after, loss)
    assert guard_stats(state)["comparisons"] == 100
    assert float(loss(apply_updates(after, updates)) - minimum) < 1e-8


def _counting_closure(model, opt, x, y, calls):
    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_deferred_dropin_guard_evaluates_the_closure_twice_per_step_and_settles(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=30.0, deferred=True)
    calls = []
    for _ in range(10):
        opt.step(_counting_closure(model, opt, x, y, calls))
    assert len(calls) == 1 + 2 * 9  # the first step has nothing pending
    stats = opt.guard_stats
    assert stats["learned_steps"] + stats["fallback_steps"] == 9
    assert stats["comparisons"] == 9
    before = [p.detach().clone() for p in model.parameters()]
    opt.settle(_counting_closure(model, opt, x, y, calls))
    assert opt.guard_stats["comparisons"] == 10
    assert opt.guard_stats["learned_steps"] + opt.guard_stats["fallback_steps"] == 10
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert moved == (opt.guard_stats["last_choice"] == "fallback")
    opt.settle(_counting_closure(model, opt, x, y, calls))  # nothing pending: no evaluation
    assert opt.guard_stats["comparisons"] == 10 and len(calls) == 21


def test_deferred_dropin_guard_comparing_every_other_step_evaluates_half_as_often(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(
        model.parameters(), checkpoint=checkpoint, lr=30.0, deferred=True, compare_every=2
    )
    calls = []
    for _ in range(10):
        opt.step(_counting_closure(model, opt, x, y, calls))
    # Comparisons are left pending on steps 0, 2, 4, 6 and 8 and decided on the next step.
    assert len(calls) == 10 + 5
    stats = opt.guard_stats
    assert stats["comparisons"] == 5
    assert stats["learned_steps"] + stats["fallback_steps"] == 10


def test_deferred_dropin_guard_rejects_overflowing_learned_steps(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, lr=1e38, deferred=True)
    _train(model, opt, x, y, 3)
    opt.settle(_counting_closure(model, opt, x, y, []))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.guard_stats["fallback_steps"] == 3


@pytest.mark.parametrize("compare_every", [1, 2])
def test_deferred_dropin_guard_rescues_a_diverging_learned_optimizer(checkpoint, compare_every):
    # A huge (finite) learned step size: alone it diverges; guarded it does as well as Adam.
    def final_loss(make):
        model, x, y = _model_and_data()
        opt = make(model)
        losses = _train(model, opt, x, y, 60)
        if isinstance(opt, GuardedLearnedOptimizer):
            opt.settle(_counting_closure(model, opt, x, y, []))
        return losses, float(nn.functional.cross_entropy(model(x), y).detach())

    alone, alone_final = final_loss(
        lambda m: LearnedOptimizer(m.parameters(), checkpoint=checkpoint, lr=3e4)
    )
    _, adam_final = final_loss(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    guarded, guarded_final = final_loss(
        lambda m: GuardedLearnedOptimizer(
            m.parameters(),
            checkpoint=checkpoint,
            lr=3e4,
            deferred=True,
            compare_every=compare_every,
        )
    )
    assert not alone_final < alone[0]  # the learned optimizer alone makes things worse
    assert guarded_final < guarded[0] and guarded_final <= adam_final * 1.02


def test_deferred_guard_state_is_refused_by_a_plain_guard(checkpoint):
    model, x, y = _model_and_data()
    opt = _make("deferred", model, checkpoint)
    _train(model, opt, x, y, 2)
    with pytest.raises(ValueError, match="saved by"):
        _make("guarded", model, checkpoint).load_state_dict(opt.state_dict())


def test_deferred_dropin_guard_takes_no_guard_closure(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, deferred=True)
    closure = _counting_closure(model, opt, x, y, [])
    with pytest.raises(ValueError, match="deferred=False"):
        opt.step(closure, guard_closure=lambda: torch.tensor(0.0))


# --- shadow=True: a bound over the whole run ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchMinimumRule(UpdateRule):
    """A greedy 'learned' rule: on 0.5·||x - c_k||² it jumps to the batch's minimiser c_k, so
    it wins every one-batch comparison and still ends far above SGD, which averages the noise."""

    def init(self, params):
        return {}

    def update(self, grads, state, params, *, step, loss_fn=None):
        return {k: -g for k, g in grads.items()}, state


def noisy_centre(dim: int = 8, steps: int = 400):
    """Batches f_k(x) = 0.5·||x - c - ξ_k||² (ξ_k ~ N(0, I)) of the full loss 0.5·||x - c||²."""
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(dim, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, dim, generator=g, dtype=torch.float64)

    def batch(k):
        return lambda p: 0.5 * ((p["x"] - centre - noise[k]) ** 2).sum()

    def full(p):
        return float(0.5 * ((p["x"] - centre) ** 2).sum())

    return batch, full, {"x": torch.zeros(dim, dtype=torch.float64)}


def run_on_batches(rule, batch, params, steps, step_type=int):
    state, losses = rule.init(params), []
    for k in range(steps):
        loss_fn = batch(k)
        grads = torch.func.grad(loss_fn)(params)
        kwargs = {"loss_fn": loss_fn} if rule.needs_loss_fn else {}
        updates, state = rule.update(grads, state, params, step=step_type(k), **kwargs)
        losses.append(loss_fn(params).detach())
        params = apply_updates(params, updates)
    return params, state, [float(v) for v in losses] if step_type is int else losses


def test_shadow_guard_ends_at_the_fallback_alone_where_every_greedy_choice_misleads():
    batch, full, x0 = noisy_centre()
    sgd = get("sgd", lr=0.05)
    alone, _, alone_losses = run_on_batches(sgd, batch, x0, 400)
    plain, plain_state, _ = run_on_batches(GuardRule(BatchMinimumRule(), sgd), batch, x0, 400)
    guarded, state, losses = run_on_batches(
        GuardRule(BatchMinimumRule(), sgd, shadow=True), batch, x0, 400
    )
    # The per-step guard takes every greedy step and ends an order of magnitude above SGD.
    assert guard_stats(plain_state)["learned_steps"] == 400
    assert full(plain) > 10 * full(alone)
    # The shadow guard restores to SGD's run, holds longer after each restore, and ends there.
    stats = guard_stats(state)
    assert 3 <= stats["shadow_restores"] <= 7  # holds of 10, 20, 40, ... steps
    assert stats["shadow_steps"] > 0.9 * 400
    assert stats["learned_steps"] + stats["fallback_steps"] + stats["shadow_steps"] == 400
    assert full(guarded) <= 1.02 * full(alone)
    smoothed = sum(losses[-100:]) / 100
    assert smoothed <= 1.02 * sum(alone_losses[-100:]) / 100


def test_shadow_is_the_fallback_alone_run_on_the_same_batches():
    batch, _, x0 = noisy_centre()
    adam = get("adam", lr=0.1)
    alone, alone_state, _ = run_on_batches(adam, batch, x0, 60)
    guard = GuardRule(BatchMinimumRule(), adam, shadow=True)
    for step_type in (int, torch.tensor):  # eager holds take the guarded run's own gradient
        _, state, _ = run_on_batches(guard, batch, x0, 60, step_type)
        assert guard_stats(state)["shadow_steps"] > 20  # it held on the shadow
        # To rounding: the guarded parameters that a restore puts onto the shadow, and that
        # eager holds step from, differ from it in the last bit.
        torch.testing.assert_close(state["shadow"]["x"], alone["x"], rtol=1e-12, atol=1e-12)
        for key, value in alone_state.items():
            torch.testing.assert_close(state["shadow_fallback"][key], value, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("deferred", [False, True])
def test_eager_shadow_holds_take_the_full_steps_result(deferred):
    # The eager hold step skips the comparison and the shadow's own evaluation; a tensor step
    # (as under vmap) takes the full step every time. Same run, same counts.
    batch, _, x0 = noisy_centre()
    guard = GuardRule(BatchMinimumRule(), get("adam", lr=0.05), deferred=deferred, shadow=True)
    eager, eager_state, _ = run_on_batches(guard, batch, x0, 200)
    batched, batched_state, _ = run_on_batches(guard, batch, x0, 200, torch.tensor)
    torch.testing.assert_close(eager["x"], batched["x"], rtol=1e-10, atol=1e-12)
    assert guard_stats(eager_state) == guard_stats(batched_state)
    assert guard_stats(eager_state)["shadow_steps"] > 50


@pytest.mark.parametrize("total_steps", [None, 50])  # 50: it commits, to the guarded run
@pytest.mark.parametrize("deferred", [False, True])
def test_shadow_guard_changes_nothing_while_the_guarded_run_is_ahead(deferred, total_steps):
    # A good 'learned' rule (SGD at 1/L) against a timid fallback: never behind, never restored.
    loss, params, _, lipschitz = quadratic(3)
    learned, fallback = get("sgd", lr=1.0 / lipschitz), get("sgd", lr=0.01 / lipschitz)

    def batch(_):
        return loss

    plain, _, _ = run_on_batches(GuardRule(learned, fallback, deferred=deferred), batch, params, 50)
    shadowed, state, _ = run_on_batches(
        GuardRule(learned, fallback, deferred=deferred, shadow=True, total_steps=total_steps),
        batch,
        params,
        50,
    )
    assert guard_stats(state)["shadow_restores"] == 0
    torch.testing.assert_close(shadowed["x"], plain["x"], rtol=0, atol=0)


def test_shadow_guard_restores_at_once_when_the_guarded_loss_is_not_finite():
    # 0.5·||x||², except that batch 3 is infinite where x₀ < 0.5: the greedy rule jumped to 0
    # at step 0 (and is ahead until then); SGD from 1 is still at 0.73 when batch 3 comes.
    def batch(k):
        def loss(p):
            x = p["x"]
            finite = 0.5 * (x**2).sum()
            return torch.where(x[0] < 0.5, torch.tensor(math.inf), finite) if k == 3 else finite

        return loss

    params = {"x": torch.ones(2, dtype=torch.float64)}
    rule = GuardRule(BatchMinimumRule(), get("sgd", lr=0.1), shadow=True)
    final, state, losses = run_on_batches(rule, batch, params, 6)
    assert guard_stats(state)["shadow_restores"] == 1
    assert losses[:3] == [1.0, 0.0, 0.0] and math.isinf(losses[3])
    assert all(math.isfinite(v) for v in losses[4:])
    assert guard_stats(state)["shadow_steps"] == 3  # the restore, then holding
    torch.testing.assert_close(final["x"], state["shadow"]["x"], rtol=0, atol=0)


@pytest.mark.parametrize("deferred", [False, True])
def test_shadow_guard_vmaps_over_a_population_like_a_loop(deferred):
    batch, _, x0 = noisy_centre(dim=4, steps=30)
    rule = GuardRule(BatchMinimumRule(), get("adam", lr=0.1), deferred=deferred, shadow=True)
    offsets = torch.tensor([[0.0], [1.0], [-2.0]], dtype=torch.float64)
    loop = [run_on_batches(rule, batch, {"x": x0["x"] + offset}, 30)[0]["x"] for offset in offsets]

    def run(x):
        return run_on_batches(rule, batch, {"x": x}, 30, step_type=torch.tensor)[0]["x"]

    vmapped = torch.func.vmap(run)(x0["x"] + offsets)
    torch.testing.assert_close(vmapped, torch.stack(loop), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("step_type", [int, torch.tensor])
def test_shadow_guard_that_knows_the_runs_length_ends_on_the_better_run(step_type):
    # No margin restore can fire (margin 1e6), so without the run's length the greedy rule's
    # run ends far above SGD alone; with it, the guard commits 11 steps before the end and
    # every one of the last 10 losses is the fallback alone's own loss, the parameters its own.
    batch, full, x0 = noisy_centre()
    sgd = get("sgd", lr=0.05)
    steps, finish = 200, 10
    alone, _, alone_losses = run_on_batches(sgd, batch, x0, steps)
    lazy = GuardRule(BatchMinimumRule(), sgd, shadow=True, shadow_margin=1e6)
    unaware, _, _ = run_on_batches(lazy, batch, x0, steps, step_type)
    assert full(unaware) > 2 * full(alone)
    aware = dataclasses.replace(lazy, total_steps=steps, shadow_finish=finish)
    final, state, losses = run_on_batches(aware, batch, x0, steps, step_type)
    losses = [float(v) for v in losses]
    assert guard_stats(state)["shadow_restores"] == 1
    assert guard_stats(state)["shadow_steps"] == finish + 1  # the committing step, then the end
    torch.testing.assert_close(final["x"], alone["x"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses[-finish:], alone_losses[-finish:], rtol=1e-12, atol=0)
    assert losses[-finish - 1] != pytest.approx(alone_losses[-finish - 1])  # not before


def test_a_shadow_hold_ending_in_the_last_steps_is_kept_to_the_end():
    # The greedy rule is restored again and again. Find where a hold of the run that does not
    # know its length ends (its last followed step), and end the run 5 steps later: without
    # the commitment the last 5 steps would be the greedy rule's again.
    batch, _, x0 = noisy_centre()
    adam = get("adam", lr=0.05)
    unaware = GuardRule(BatchMinimumRule(), adam, shadow=True)
    holds, state, params = [], unaware.init(x0), x0
    for k in range(150):
        grads = torch.func.grad(batch(k))(params)
        updates, state = unaware.update(grads, state, params, step=k, loss_fn=batch(k))
        params = apply_updates(params, updates)
        holds.append(int(state["shadow_hold"]))
    hold_ends = [k for k in range(60, 150) if holds[k - 1] == 1 and holds[k] == 0]
    steps = hold_ends[0] + 6
    aware = dataclasses.replace(unaware, total_steps=steps)
    alone, _, alone_losses = run_on_batches(adam, batch, x0, steps)
    eager, eager_state, eager_losses = run_on_batches(aware, batch, x0, steps)
    batched, batched_state, _ = run_on_batches(aware, batch, x0, steps, torch.tensor)
    torch.testing.assert_close(eager["x"], batched["x"], rtol=1e-10, atol=1e-12)
    assert guard_stats(eager_state) == guard_stats(batched_state)
    torch.testing.assert_close(eager["x"], alone["x"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(eager_losses[-10:], alone_losses[-10:], rtol=1e-10, atol=0)
    # Where the run does not know its length, it leaves the shadow in its last steps.
    _, _, unaware_losses = run_on_batches(unaware, batch, x0, steps)
    assert unaware_losses[-4:] != pytest.approx(alone_losses[-4:], rel=1e-6)


@pytest.mark.parametrize(
    ("field", "value"),
    [("total_steps", 0), ("total_steps", 2.5), ("total_steps", True), ("shadow_finish", -1)],
)
def test_shadow_guard_refuses_a_bad_run_length(field, value):
    with pytest.raises(ValueError, match=field):
        GuardRule(ScaledSignRule(), get("sgd", lr=0.1), shadow=True, **{field: value})


@pytest.mark.parametrize(
    ("field", "value"),
    [("shadow", 1), ("shadow_margin", -0.1), ("shadow_decay", 1.0), ("shadow_hold", 0)],
)
def test_shadow_guard_refuses_bad_settings(field, value):
    with pytest.raises(ValueError, match=field):
        GuardRule(ScaledSignRule(), get("sgd", lr=0.1), **{field: value})


@pytest.mark.parametrize("total_steps", [None, 80])
@pytest.mark.parametrize("deferred", [False, True])
def test_shadow_dropin_guard_rescues_a_diverging_learned_optimizer(
    checkpoint, deferred, total_steps
):
    def run(make):
        model, x, y = _model_and_data()
        opt = make(model)
        _train(model, opt, x, y, 80)
        if isinstance(opt, GuardedLearnedOptimizer):
            opt.settle(_counting_closure(model, opt, x, y, []))
        return opt, float(nn.functional.cross_entropy(model(x), y).detach())

    _, adam_final = run(lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    opt, guarded_final = run(
        lambda m: GuardedLearnedOptimizer(
            m.parameters(),
            checkpoint=checkpoint,
            lr=3e4,
            shadow=True,
            deferred=deferred,
            total_steps=total_steps,
        )
    )
    assert guarded_final <= adam_final * 1.02
    if total_steps is not None:  # committed to the shadow before the end: Adam alone's model
        assert opt.rule.total_steps == total_steps
        assert guarded_final == pytest.approx(adam_final, rel=1e-5)


def test_shadow_dropin_guard_calls_the_closure_once_more_per_step(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, shadow=True)
    calls = []
    for _ in range(5):
        opt.step(_counting_closure(model, opt, x, y, calls))
    assert len(calls) == 5 * 4  # the step's own, two candidates, the shadow


def test_shadow_guard_holding_on_the_shadow_evaluates_nothing_more():
    # As the drop-in calls it (the step's loss known): a full step evaluates the two
    # candidates and the shadow, a hold step nothing beyond the step's own loss and gradient.
    batch, _, params = noisy_centre()
    guard = GuardRule(BatchMinimumRule(), get("sgd", lr=0.05), shadow=True)
    state, evaluations = guard.init(params), 0

    def counted(fn):
        def run(p):
            nonlocal evaluations
            evaluations += 1
            return fn(p)

        return run

    for k in range(200):
        loss, grads = batch(k)(params), torch.func.grad(batch(k))(params)
        loss_fn = FunctionalLoss(counted(batch(k)), known_loss=loss)
        updates, state = guard.update(grads, state, params, step=k, loss_fn=loss_fn)
        params = apply_updates(params, updates)
    stats = guard_stats(state)
    held = stats["shadow_steps"] - stats["shadow_restores"]  # a restore's own step is full
    assert stats["shadow_restores"] >= 2 and held >= 100
    assert evaluations == 3 * (200 - held)


def test_shadow_dropin_guard_state_round_trips_and_is_refused_by_a_plain_guard(
    checkpoint, tmp_path
):
    def make(model, shadow=True):
        return GuardedLearnedOptimizer(
            model.parameters(), checkpoint=checkpoint, lr=3e4, shadow=shadow
        )

    model, x, y = _model_and_data()
    opt = make(model)
    _train(model, opt, x, y, 15)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "mid.pt")
    expected = _train(model, opt, x, y, 10)
    saved = torch.load(tmp_path / "mid.pt")
    resumed_model, _, _ = _model_and_data()
    resumed_model.load_state_dict(saved["model"])
    resumed = make(resumed_model)
    resumed.load_state_dict(saved["opt"])
    assert _train(resumed_model, resumed, x, y, 10) == expected
    assert resumed.guard_stats == opt.guard_stats
    with pytest.raises(ValueError, match="saved by"):
        make(resumed_model, shadow=False).load_state_dict(saved["opt"])


def test_shadow_dropin_guard_takes_no_guard_closure(checkpoint):
    model, x, y = _model_and_data()
    opt = GuardedLearnedOptimizer(model.parameters(), checkpoint=checkpoint, shadow=True)
    with pytest.raises(ValueError, match="shadow=False"):
        opt.step(_counting_closure(model, opt, x, y, []), guard_closure=lambda: torch.tensor(0.0))


def _entrywise_all_finite(tree):
    return all(bool(torch.isfinite(v).all()) for v in tree.values() if v.is_floating_point())


@pytest.mark.parametrize(
    "tree",
    [
        {"w": torch.randn(4, 5), "n": torch.arange(3)},
        {"w": torch.full((1000,), 3e38)},  # finite entries whose float32 sum overflows
        {"h": torch.full((100,), 6e4, dtype=torch.float16)},  # a float16 sum would overflow
        {"d": torch.full((3,), 1e300, dtype=torch.float64)},  # finite, not in float32
        {"w": torch.tensor([1.0, float("nan")]), "v": torch.ones(2)},
        {"w": torch.tensor([float("inf"), -float("inf")])},  # a sum of NaN
        {"b": torch.tensor([1.0, -float("inf")], dtype=torch.bfloat16)},
        {"e": torch.zeros(0), "w": torch.ones(2)},
        {"n": torch.arange(3)},
    ],
)
def test_the_guards_finiteness_check_matches_the_entrywise_one(tree):
    expected = _entrywise_all_finite(tree)
    assert bool(_all_finite(tree)) == expected  # eagerly: sums first, then entries
    stacked = {k: torch.stack([v, v]) for k, v in tree.items()}
    under_vmap = torch.func.vmap(_all_finite)(stacked)  # entries, as a tensor per member
    assert under_vmap.tolist() == [expected, expected]
