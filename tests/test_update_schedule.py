"""Checkpoints meta-trained with an update schedule (``estimator.update_schedule``) anneal over
the user's run: in ``LearnedOptimizer``, ``GuardedLearnedOptimizer`` and ``l2o-eval``."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import l2o
from l2o.eval.contenders import learned_contenders, rule_contender
from l2o.learned import OrthoMLPLOpt, save_checkpoint
from l2o.learned.checkpoint import load_checkpoint, update_schedule_of
from l2o.optim.base import apply_updates
from l2o.optim.schedules import Cosine, run_annealing, stable_decay


def _checkpoint(tmp_path, update_schedule):
    lopt = OrthoMLPLOpt()
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    config = {"estimator": {"update_schedule": update_schedule}}
    save_checkpoint(tmp_path / update_schedule, lopt, meta, extra_card={"config": config})
    return tmp_path / update_schedule


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, generator=g), torch.randn(16, 2, generator=g)


def _train(model, opt, steps, scheduler=None):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _functional(model, rule, steps):
    """The rule in a plain functional loop, the reference for the drop-in optimizer."""
    x, y = _data()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = rule.init(params)
    for t in range(steps):
        leaves = {k: v.requires_grad_() for k, v in params.items()}
        out = torch.func.functional_call(model, leaves, (x,))
        grads = torch.autograd.grad(torch.nn.functional.mse_loss(out, y), list(leaves.values()))
        updates, state = rule.update(dict(zip(leaves, grads)), state, params, step=t)
        params = {k: v.detach() for k, v in apply_updates(params, updates).items()}
    return params


def test_the_card_says_how_the_checkpoint_was_annealed(tmp_path):
    assert update_schedule_of({}) == "constant"
    assert update_schedule_of({"config": {"estimator": {"horizon": 5}}}) == "constant"
    _, _, card = load_checkpoint(_checkpoint(tmp_path, "cosine"))
    assert update_schedule_of(card) == "cosine"
    # A deployment schedule chosen after meta-training takes the place of the episodes' one.
    config = {"estimator": {"update_schedule": "constant"}, "deploy_schedule": "wsd"}
    assert update_schedule_of({"config": config}) == "wsd"
    config = {"estimator": {"update_schedule": "cosine"}, "deploy_schedule": None}
    assert update_schedule_of({"config": config}) == "cosine"


def test_an_annealed_checkpoint_needs_total_steps_and_anneals_over_them(tmp_path):
    path = _checkpoint(tmp_path, "cosine")
    model = _model()
    with pytest.raises(ValueError, match="pass total_steps="):
        l2o.LearnedOptimizer(model.parameters(), checkpoint=path)
    with pytest.raises(ValueError, match="total_steps"):
        l2o.LearnedOptimizer(model.parameters(), checkpoint=path, total_steps=0)
    lopt, meta, _ = load_checkpoint(path)
    expected = _functional(
        copy.deepcopy(model), lopt.rule(meta, lr=Cosine(lr=0.5, total_steps=6)), 4
    )
    ours = copy.deepcopy(model)
    opt = l2o.LearnedOptimizer(ours.parameters(), checkpoint=path, lr=0.5, total_steps=6)
    _train(ours, opt, 4)
    for (k, p), q in zip(ours.named_parameters(), expected.values()):
        torch.testing.assert_close(p.detach(), q, msg=k)
    assert opt.param_groups[0]["lr"] == 0.5  # a number, for LR schedulers and state_dict

    # Steps from total_steps on move nothing; the state still round-trips weights-only.
    _train(ours, opt, 2)
    frozen = [p.detach().clone() for p in ours.parameters()]
    _train(ours, opt, 2)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), frozen))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    again = l2o.LearnedOptimizer(ours.parameters(), checkpoint=path, total_steps=6)
    again.load_state_dict(torch.load(buffer, weights_only=True))


def test_an_lr_scheduler_still_multiplies_the_annealed_step(tmp_path):
    path = _checkpoint(tmp_path, "linear")
    lopt, meta, _ = load_checkpoint(path)
    model = _model()
    ours = copy.deepcopy(model)
    opt = l2o.LearnedOptimizer(ours.parameters(), checkpoint=path, total_steps=5)
    # A constant factor of 0.5 from a torch scheduler, on top of the linear annealing.
    scheduler = torch.optim.lr_scheduler.ConstantLR(opt, factor=0.5, total_iters=100)
    _train(ours, opt, 3, scheduler)
    expected = _functional(
        copy.deepcopy(model), lopt.rule(meta, lr=run_annealing("linear", 5, 0.5)), 3
    )
    for p, q in zip(ours.parameters(), expected.values()):
        torch.testing.assert_close(p.detach(), q)


def test_a_constant_checkpoint_ignores_total_steps(tmp_path):
    path = _checkpoint(tmp_path, "constant")
    model = _model()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _train(a, l2o.LearnedOptimizer(a.parameters(), checkpoint=path), 3)
    _train(b, l2o.LearnedOptimizer(b.parameters(), checkpoint=path, total_steps=3), 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_wsd_checkpoint_cools_down_over_total_steps_or_runs_its_stable_phase(tmp_path):
    path = _checkpoint(tmp_path, "wsd")
    lopt, meta, _ = load_checkpoint(path)
    model = _model()
    # With total_steps: constant for 8 of 10 steps, then linear to 0 (the functional reference).
    ours = copy.deepcopy(model)
    _train(ours, l2o.LearnedOptimizer(ours.parameters(), checkpoint=path, total_steps=10), 10)
    expected = _functional(copy.deepcopy(model), lopt.rule(meta, lr=stable_decay(1.0, 10, 0.2)), 10)
    for p, q in zip(ours.parameters(), expected.values()):
        torch.testing.assert_close(p.detach(), q)
    # Without: the constant-step optimizer (its stable phase), and a warning saying so.
    stable = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="without that cool-down"):
        opt = l2o.LearnedOptimizer(stable.parameters(), checkpoint=path)
    _train(stable, opt, 10)
    constant = _functional(copy.deepcopy(model), lopt.rule(meta), 10)
    for p, q in zip(stable.parameters(), constant.values()):
        torch.testing.assert_close(p.detach(), q)
    assert not all(torch.allclose(p, q) for p, q in zip(stable.parameters(), ours.parameters()))
    with pytest.warns(UserWarning, match="cool-down"):
        l2o.GuardedLearnedOptimizer(model.parameters(), checkpoint=path)


def test_the_guard_anneals_its_fallback_as_it_anneals_the_learned_candidate(tmp_path):
    path = _checkpoint(tmp_path, "cosine")
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match="pass total_steps="):
        l2o.GuardedLearnedOptimizer(model.parameters(), checkpoint=path)
    opt = l2o.GuardedLearnedOptimizer(
        model.parameters(), checkpoint=path, fallback_kwargs={"lr": 0.01}, total_steps=3
    )
    rule = opt._group_rule(opt.param_groups[0])
    assert rule.lr == Cosine(lr=1.0, total_steps=3)
    assert rule.fallback == l2o.optim.get("adam", lr=Cosine(lr=0.01, total_steps=3))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        assert math.isfinite(float(opt.step(closure).detach()))
    # Past total_steps both candidates are 0, whichever the guard takes: the run stands still
    # (a constant-rate fallback would go on moving it).
    frozen = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), frozen))


def test_the_guard_keeps_a_constant_fallback_or_one_with_its_own_schedule(tmp_path):
    model = _model()
    constant = l2o.GuardedLearnedOptimizer(
        model.parameters(), checkpoint=_checkpoint(tmp_path, "constant"), total_steps=5
    )
    assert constant._group_rule(constant.param_groups[0]).fallback == l2o.optim.get("adam")
    own = Cosine(lr=0.02, total_steps=100)
    scheduled = l2o.GuardedLearnedOptimizer(
        model.parameters(),
        checkpoint=_checkpoint(tmp_path, "linear"),
        fallback_kwargs={"lr": own},
        total_steps=5,
    )
    assert scheduled._group_rule(scheduled.param_groups[0]).fallback.lr == own


def test_update_schedule_anneals_otherwise_than_the_card(tmp_path):
    path = _checkpoint(tmp_path, "constant")
    lopt, meta, _ = load_checkpoint(path)
    model = _model()
    ours = copy.deepcopy(model)
    opt = l2o.LearnedOptimizer(
        ours.parameters(), checkpoint=path, update_schedule="wsd", total_steps=10
    )
    _train(ours, opt, 10)
    expected = _functional(copy.deepcopy(model), lopt.rule(meta, lr=stable_decay(1.0, 10, 0.2)), 10)
    for p, q in zip(ours.parameters(), expected.values()):
        torch.testing.assert_close(p.detach(), q)
    # ... and back to constant steps for a checkpoint meta-trained annealed.
    plain = copy.deepcopy(model)
    cosine = _checkpoint(tmp_path, "cosine")
    opt = l2o.LearnedOptimizer(plain.parameters(), checkpoint=cosine, update_schedule="constant")
    _train(plain, opt, 3)
    lopt, meta, _ = load_checkpoint(cosine)
    expected = _functional(copy.deepcopy(model), lopt.rule(meta), 3)
    for p, q in zip(plain.parameters(), expected.values()):
        torch.testing.assert_close(p.detach(), q)
    with pytest.raises(ValueError, match="update_schedule must be one of"):
        l2o.LearnedOptimizer(model.parameters(), checkpoint=path, update_schedule="cosin")
    guarded = l2o.GuardedLearnedOptimizer(
        model.parameters(), checkpoint=path, update_schedule="wsd", total_steps=10
    )
    assert guarded._group_rule(guarded.param_groups[0]).lr == stable_decay(1.0, 10, 0.2)


def test_l2o_eval_builds_an_annealed_checkpoint_over_each_entrys_horizon(tmp_path):
    fallback = rule_contender("adam")
    annealed, guarded = learned_contenders(
        str(_checkpoint(tmp_path, "cosine")), guarded=True, unguarded=True, fallback=fallback
    )
    assert annealed.spec()["update_schedule"] == "cosine"
    assert annealed.build(horizon=40).lr == Cosine(lr=1.0, total_steps=40)
    assert guarded.build(1e-3, horizon=40).lr == 1.0  # the learned side carries the factor
    assert guarded.build(1e-3, horizon=40).learned.lr == Cosine(lr=1.0, total_steps=40)
    # Its fallback anneals alike, tuned as the annealed baseline it is.
    assert guarded.fallback == rule_contender("adam", update_schedule="cosine")
    assert guarded.name.endswith("+guard(adam+cosine)")
    assert guarded.build(1e-3, horizon=40).fallback.lr == Cosine(lr=1e-3, total_steps=40)
    with pytest.raises(ValueError, match="horizon"):
        annealed.build()
    (constant,) = learned_contenders(
        str(_checkpoint(tmp_path, "constant")), guarded=False, unguarded=True, fallback=fallback
    )
    assert "update_schedule" not in constant.spec()  # earlier cells keep their keys
    assert constant.build(horizon=40).lr == 1.0
    (constant_guard,) = learned_contenders(
        str(_checkpoint(tmp_path, "constant")), guarded=True, unguarded=False, fallback=fallback
    )
    assert constant_guard.fallback == fallback
    assert constant_guard.name.endswith("+guard(adam)")


def test_a_baseline_can_anneal_its_tuned_lr_over_each_run():
    from l2o.eval.contenders import ContenderError

    adam = rule_contender("adam", update_schedule="cosine")
    assert adam.name == "adam+cosine" and adam.spec()["update_schedule"] == "cosine"
    assert adam.build(3e-3, 50).lr == Cosine(lr=3e-3, total_steps=50)
    # The lr grid search vmaps over the lr as a tensor: the schedule keeps it per member.
    lrs = torch.tensor([1e-3, 1e-2])
    factors = torch.vmap(lambda lr: adam.build(lr, 10).lr(torch.tensor(5)))(lrs)
    torch.testing.assert_close(factors, lrs.double() * 0.5, rtol=1e-6, atol=0)
    assert "update_schedule" not in rule_contender("adam").spec()
    with pytest.raises(ContenderError, match="update_schedule must be one of"):
        rule_contender("adam", update_schedule="exponential")
    with pytest.raises(ValueError, match="give lr and horizon"):
        adam.build(3e-3)


def test_l2o_eval_can_anneal_a_checkpoint_otherwise_than_its_card(tmp_path):
    from omegaconf import OmegaConf

    from l2o.cli.eval import ConfigError, _checkpoint_item
    from l2o.eval.contenders import ContenderError

    path = str(_checkpoint(tmp_path, "constant"))
    fallback = rule_contender("adam")
    (plain,) = learned_contenders(path, guarded=False, unguarded=True, fallback=fallback)
    (annealed,) = learned_contenders(
        path, guarded=False, unguarded=True, fallback=fallback, update_schedule="cosine"
    )
    assert annealed.name == f"{plain.name}+cosine" and annealed.spec() != plain.spec()
    assert annealed.build(horizon=30).lr == Cosine(lr=1.0, total_steps=30)
    (same,) = learned_contenders(  # what the card says already: no new label
        path, guarded=False, unguarded=True, fallback=fallback, update_schedule="constant"
    )
    assert same.name == plain.name and same.spec() == plain.spec()
    with pytest.raises(ContenderError, match="update_schedule must be one of"):
        learned_contenders(
            path, guarded=False, unguarded=True, fallback=fallback, update_schedule="x"
        )

    item = OmegaConf.create({"checkpoint": path, "update_schedule": "cosine"})
    assert _checkpoint_item(item, "checkpoints.0") == (path, "cosine", None)
    assert _checkpoint_item("default", "checkpoints.0") == ("default", None, None)
    item = OmegaConf.create({"checkpoint": path, "ns_dtype": "bfloat16"})
    assert _checkpoint_item(item, "checkpoints.0") == (path, None, "bfloat16")
    with pytest.raises(ConfigError, match="unknown keys"):
        _checkpoint_item(OmegaConf.create({"checkpoint": path, "lr": 1}), "checkpoints.0")
    with pytest.raises(ConfigError, match="names no checkpoint"):
        _checkpoint_item(OmegaConf.create({"update_schedule": "cosine"}), "checkpoints.0")


def test_a_card_naming_an_unknown_update_schedule_fails_before_any_work(tmp_path):
    from l2o.eval.contenders import ContenderError

    path = _checkpoint(tmp_path, "sawtooth")
    with pytest.raises(ContenderError, match="update_schedule must be one of"):
        learned_contenders(
            str(path), guarded=False, unguarded=True, fallback=rule_contender("adam")
        )
    with pytest.raises(ValueError, match="update_schedule must be one of"):
        l2o.LearnedOptimizer(_model().parameters(), checkpoint=path, total_steps=10)
