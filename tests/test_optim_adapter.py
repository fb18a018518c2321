"""RuleOptimizer keeps torch.optim's contract: state, checkpoints, schedulers, closures, dtypes."""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

import l2o.optim as O
from l2o.optim import RuleOptimizer, rules
from l2o.optim.base import UpdateRule, value_and_grad


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    y = torch.cos(x @ torch.randn(3, 2, generator=g))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    return model, x, y


def _train(model, opt, x, y, steps, scheduler=None):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _assert_same_params(a, b, **tol):
    for p, q in zip(a.parameters(), b.parameters()):
        if tol:
            torch.testing.assert_close(p, q, **tol)
        else:
            assert torch.equal(p, q)


CHECKPOINTED = {
    "sgd-momentum": (O.SGD, dict(lr=0.05, momentum=0.9)),
    "rmsprop-centered-momentum": (O.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True)),
    "adagrad": (O.Adagrad, dict(lr=0.05, lr_decay=0.01)),
    "adam-amsgrad": (O.Adam, dict(lr=1e-2, amsgrad=True)),
    "nadam": (O.NAdam, dict(lr=1e-2)),  # mu_product: a global slot
}


@pytest.mark.parametrize("case", CHECKPOINTED)
def test_state_dict_saved_mid_run_resumes_bit_identically_with_weights_only_load(case):
    cls, hparams = CHECKPOINTED[case]
    model, x, y = _problem()
    opt = cls(model.parameters(), **hparams)
    _train(model, opt, x, y, 7)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    _train(model, opt, x, y, 8)  # the uninterrupted run

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, _, _ = _problem()
    resumed.load_state_dict(saved["model"])
    resumed_opt = cls(resumed.parameters(), **hparams)
    resumed_opt.load_state_dict(saved["opt"])
    _train(resumed, resumed_opt, x, y, 8)
    _assert_same_params(model, resumed)


def test_state_layout_per_parameter_slots_and_group_step_on_first_param():
    model, x, y = _problem()
    opt = O.NAdam(model.parameters())
    _train(model, opt, x, y, 3)
    state = opt.state_dict()["state"]
    first, second = state[0], state[1]
    assert int(first["step"]) == 3 and first["step"].dtype == torch.int64
    assert first["group:mu_product"].shape == ()
    assert set(second) == {"exp_avg", "exp_avg_sq"}
    weight = next(model.parameters())
    assert first["exp_avg"].shape == weight.shape and first["exp_avg"].dtype == weight.dtype


def test_rule_state_with_nested_and_global_slots_round_trips_through_the_adapter():
    @dataclasses.dataclass(frozen=True)
    class Nested(UpdateRule):
        lr: float = 0.1

        def init(self, params):
            zeros = {k: torch.zeros_like(p) for k, p in params.items()}
            return {"moments": {"first": zeros}, "count": {"calls": torch.zeros(())}}

        def update(self, grads, state, params, *, step, loss_fn=None):
            first = {k: 0.5 * state["moments"]["first"][k] + g for k, g in grads.items()}
            count = {"calls": state["count"]["calls"] + 1}
            return {k: -self.lr * m for k, m in first.items()}, {
                "moments": {"first": first},
                "count": count,
            }

    model, x, y = _problem()
    opt = RuleOptimizer(model.parameters(), Nested())
    _train(model, opt, x, y, 4)
    anchor = opt.state[next(model.parameters())]
    assert float(anchor["group:count/calls"]) == 4
    assert "moments/first" in anchor


TWINS = {
    "sgd": (O.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adam": (O.Adam, torch.optim.Adam, dict(lr=1e-2)),
    "nadam": (O.NAdam, torch.optim.NAdam, dict(lr=1e-2)),
    "rmsprop": (O.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
}
SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "one-cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=30, cycle_momentum=True
    ),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("case", TWINS)
def test_lr_scheduler_changes_steps_exactly_as_for_the_torch_optim_twin(case, scheduler):
    ours_cls, twin_cls, hparams = TWINS[case]
    if scheduler == "one-cycle" and case == "rmsprop":
        hparams = {**hparams, "momentum": 0.9}
    ours, x, y = _problem()
    twin, _, _ = _problem()
    opt = ours_cls(ours.parameters(), **hparams)
    twin_opt = twin_cls(twin.parameters(), foreach=False, **hparams)
    _train(ours, opt, x, y, 25, SCHEDULERS[scheduler](opt))
    _train(twin, twin_opt, x, y, 25, SCHEDULERS[scheduler](twin_opt))
    _assert_same_params(ours, twin, rtol=1e-10, atol=1e-12)
    for group, twin_group in zip(opt.param_groups, twin_opt.param_groups):
        assert group["lr"] == twin_group["lr"]


def test_param_groups_with_their_own_hyperparameters_match_torch():
    ours, x, y = _problem()
    twin, _, _ = _problem()

    def groups(model):
        first, second = model[0], model[2]
        return [
            {"params": first.parameters(), "lr": 1e-2, "betas": (0.8, 0.9)},
            {"params": second.parameters(), "weight_decay": 0.1},
        ]

    opt = O.Adam(groups(ours), lr=3e-3)
    twin_opt = torch.optim.Adam(groups(twin), lr=3e-3, foreach=False)
    _train(ours, opt, x, y, 20)
    _train(twin, twin_opt, x, y, 20)
    _assert_same_params(ours, twin, rtol=1e-10, atol=1e-12)


def test_zero_grad_in_place_does_not_touch_sgd_momentum_buffer():
    ours, x, y = _problem()
    twin, _, _ = _problem()
    opt = O.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for model, optimizer in ((ours, opt), (twin, twin_opt)):
        for _ in range(5):
            optimizer.zero_grad(set_to_none=False)  # zeroes .grad in place
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    _assert_same_params(ours, twin, rtol=1e-12, atol=1e-14)


def test_params_without_grad_are_skipped_then_get_state_when_they_have_one():
    model, x, y = _problem()
    head = torch.nn.Linear(2, 1)
    opt = O.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    head_before = [p.detach().clone() for p in head.parameters()]
    _train(model, opt, x, y, 3)  # head gets no gradient
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), head_before))
    assert all(p not in opt.state for p in head.parameters())
    assert int(opt.state[next(model.parameters())]["step"]) == 3

    opt.zero_grad()
    head(model(x)).pow(2).mean().backward()
    opt.step()
    for p, before in zip(head.parameters(), head_before):
        assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}
        assert not torch.equal(p, before)


def test_group_without_any_grad_is_left_alone():
    model, x, y = _problem()
    frozen = torch.nn.Linear(2, 2)
    opt = O.SGD(
        [{"params": model.parameters()}, {"params": frozen.parameters()}], lr=0.1, momentum=0.9
    )
    _train(model, opt, x, y, 2)
    assert all(p not in opt.state for p in frozen.parameters())


def test_sparse_gradient_raises_a_clear_error():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = O.Adam(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_bad_hyperparameters_fail_at_construction_also_in_param_groups():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="lr"):
        O.Adam(params, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        O.SGD([{"params": params, "momentum": float("nan")}])
    with pytest.raises(TypeError, match="no hyper-parameter 'beta'"):
        RuleOptimizer(params, rules.Adam(), beta=0.9)
    with pytest.raises(TypeError, match="UpdateRule"):
        RuleOptimizer(params, torch.optim.Adam)


def test_generic_constructor_takes_defaults_from_the_rule_and_overrides():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = RuleOptimizer(params, rules.RMSprop(alpha=0.9), lr=0.5)
    assert opt.defaults == {
        "lr": 0.5,
        "alpha": 0.9,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
    }
    assert opt.param_groups[0]["lr"] == 0.5


def test_step_returns_the_closure_loss_and_matches_a_plain_step():
    ours, x, y = _problem()
    twin, _, _ = _problem()
    opt = O.Adam(ours.parameters(), lr=1e-2)
    twin_opt = O.Adam(twin.parameters(), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ours(x), y)
        loss.backward()
        return loss

    with torch.no_grad():  # the closure still runs with gradients enabled
        loss = opt.step(closure)
    _train(twin, twin_opt, x, y, 1)
    assert loss.requires_grad
    _assert_same_params(ours, twin)


@dataclasses.dataclass(frozen=True)
class _BestOfTwo(UpdateRule):
    """Test rule that probes: the better of a gradient step of lr and one of 2·lr, measured with
    loss_fn, then a gradient check with value_and_grad at the chosen point."""

    lr: float = 0.05
    needs_loss_fn = True

    def init(self, params):
        return {"picked_long": torch.zeros(())}

    def update(self, grads, state, params, *, step, loss_fn=None):
        short = {k: -self.lr * g for k, g in grads.items()}
        long = {k: -2 * self.lr * g for k, g in grads.items()}
        take_long = loss_fn({k: p + long[k] for k, p in params.items()}) < loss_fn(
            {k: p + short[k] for k, p in params.items()}
        )
        updates = long if take_long else short
        _, grads_there = value_and_grad(loss_fn, {k: p + updates[k] for k, p in params.items()})
        assert all(torch.isfinite(g).all() for g in grads_there.values())
        return updates, {"picked_long": state["picked_long"] + float(take_long)}


def test_probing_rule_needs_a_closure_and_leaves_params_where_its_update_puts_them():
    model, x, y = _problem()
    opt = RuleOptimizer(model.parameters(), _BestOfTwo())
    with pytest.raises(RuntimeError, match=r"needs a closure.*optimizer.step\(closure\)"):
        opt.step()

    def loss_of(m):
        return torch.nn.functional.mse_loss(m(x), y)

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    for _ in range(4):
        # The same choice made by hand on a copy, from the gradient at the current point.
        reference = copy.deepcopy(model)
        reference.zero_grad()
        loss_of(reference).backward()
        with torch.no_grad():
            candidates = []
            for scale in (1, 2):
                trial = copy.deepcopy(reference)
                for p, r in zip(trial.parameters(), reference.parameters()):
                    p -= scale * 0.05 * r.grad
                candidates.append((loss_of(trial), trial))
            expected = candidates[1][1] if candidates[1][0] < candidates[0][0] else candidates[0][1]
        opt.step(closure)
        _assert_same_params(model, expected, rtol=1e-12, atol=1e-14)


def test_loss_fn_offers_the_known_closure_loss_to_the_rule():
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Peek(UpdateRule):
        needs_loss_fn = True

        def init(self, params):
            return {}

        def update(self, grads, state, params, *, step, loss_fn=None):
            seen.append(loss_fn.known_loss)
            return {k: torch.zeros_like(p) for k, p in params.items()}, state

    model, x, y = _problem()
    opt = RuleOptimizer(model.parameters(), Peek())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert seen == [loss.detach()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cls", [O.Adam, O.SGD, O.NAdam])
def test_low_precision_params_keep_state_in_their_dtype_and_track_the_torch_twin(dtype, cls):
    # eps=1e-8 is 0 in float16, where g² also underflows: 0/0 (torch.optim's Adam does the same).
    hparams = {"lr": 1e-2, "eps": 1e-4} if cls is not O.SGD else {"lr": 0.05, "momentum": 0.9}
    ours, x, y = _problem()
    twin, _, _ = _problem()
    ours.to(dtype), twin.to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    opt = cls(ours.parameters(), **hparams)
    twin_opt = getattr(torch.optim, cls.__name__)(twin.parameters(), foreach=False, **hparams)
    _train(ours, opt, x, y, 5)
    _train(twin, twin_opt, x, y, 5)
    for p in ours.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == dtype, key
    resolution = torch.finfo(dtype).eps
    _assert_same_params(ours, twin, rtol=4 * resolution, atol=4 * resolution)


@pytest.mark.gpu
@pytest.mark.parametrize("case", TWINS)
def test_cuda_params_match_the_torch_optim_twin_and_resume_from_a_cpu_checkpoint(case):
    ours_cls, twin_cls, hparams = TWINS[case]
    ours, x, y = _problem()
    twin, _, _ = _problem()
    ours.cuda(), twin.cuda()
    x, y = x.cuda(), y.cuda()
    opt = ours_cls(ours.parameters(), **hparams)
    twin_opt = twin_cls(twin.parameters(), **hparams)
    _train(ours, opt, x, y, 20)
    _train(twin, twin_opt, x, y, 20)
    _assert_same_params(ours, twin, rtol=1e-9, atol=1e-11)
    assert all(v.is_cuda for p in ours.parameters() for k, v in opt.state[p].items() if k != "step")

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    cpu_model, _, _ = _problem()
    cpu_model.load_state_dict({k: v.cpu() for k, v in ours.state_dict().items()})
    cpu_opt = ours_cls(cpu_model.parameters(), **hparams)
    cpu_opt.load_state_dict(torch.load(buffer, weights_only=True, map_location="cpu"))
    _train(cpu_model, cpu_opt, x.cpu(), y.cpu(), 3)
    _train(ours, opt, x, y, 3)
    for p, q in zip(ours.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-9, atol=1e-11)


def test_every_loss_fn_a_rule_can_get_follows_the_protocol():
    from l2o.optim.adapter import ClosureLoss
    from l2o.optim.base import FunctionalLoss, LossFn, as_loss_fn

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def closure():
        p.grad = None
        loss = (p**2).sum()
        loss.backward()
        return loss

    values = {"0": torch.tensor([3.0, -1.0])}
    closure_loss = ClosureLoss(closure, {"0": p})
    functional = as_loss_fn(lambda params: (params["0"] ** 2).sum())
    assert isinstance(functional, FunctionalLoss) and as_loss_fn(functional) is functional
    for loss_fn in (closure_loss, functional):
        assert isinstance(loss_fn, LossFn) and loss_fn.known_loss is None
        loss, grads = loss_fn.value_and_grad(values)
        assert float(loss) == 10.0 and torch.equal(grads["0"], torch.tensor([6.0, -2.0]))
    with pytest.raises(TypeError, match="callable"):
        as_loss_fn(3)


@pytest.mark.parametrize(
    "name", ["sgd", "momentum", "rmsprop", "adam", "amsgrad", "adamax", "nadam"]
)
def test_declared_parameter_slots_cover_what_init_holds_per_parameter(name):
    from l2o.optim import get

    rule = get(name, **({"centered": True, "momentum": 0.9} if name == "rmsprop" else {}))
    params = {"0": torch.zeros(3), "1": torch.zeros(2, 2)}
    state = rule.init(params)
    per_param = {k for k, v in state.items() if isinstance(v, dict) and set(v) == set(params)}
    assert per_param <= rule.parameter_slots()
    assert all(k not in rule.parameter_slots() for k in state if k not in per_param)


def test_a_global_dict_keyed_like_the_params_is_not_mistaken_for_a_slot():
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Counts(UpdateRule):
        """A global table that happens to be keyed "0": with PARAMETER_SLOTS declared, it stays
        one global entry instead of being spread into optimizer.state[p]."""

        PARAMETER_SLOTS: ClassVar[frozenset[str]] = frozenset()

        def init(self, params):
            return {"table": {"0": torch.zeros(())}}

        def update(self, grads, state, params, *, step, loss_fn=None):
            table = {"0": state["table"]["0"] + 1}
            return {k: torch.zeros_like(g) for k, g in grads.items()}, {"table": table}

    p = torch.nn.Parameter(torch.zeros(2))
    opt = RuleOptimizer([p], Counts())
    for _ in range(3):
        p.grad = torch.ones(2)
        opt.step()
    assert set(opt.state[p]) == {"step", "group:table/0"}
    assert float(opt.state[p]["group:table/0"]) == 3.0


def test_named_parameters_reach_the_rule_under_their_names_and_plain_ones_by_position():
    seen = []

    class Recording(rules.SGD):
        def update(self, grads, state, params, *, step, loss_fn=None):
            seen.append(sorted(params))
            return super().update(grads, state, params, step=step, loss_fn=loss_fn)

    model, x, y = _problem()
    _train(model, RuleOptimizer(model.named_parameters(), Recording(lr=0.1)), x, y, 1)
    _train(model, RuleOptimizer(model.parameters(), Recording(lr=0.1)), x, y, 1)
    assert seen == [sorted(n for n, _ in model.named_parameters()), ["0", "1", "2", "3"]]


def test_repeated_parameter_names_in_a_group_are_refused_at_construction():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"names repeat.*\['w'\]"):
        O.Adam([("w", a), ("w", b)])


def test_ortho_mlp_vector_keys_match_model_names_in_the_drop_in_optimizer():
    # An embedding named in vector_keys takes the vector rule, as in meta-training; with
    # plain parameters (keys "0", "1") the same tensor would be orthogonalised as a matrix.
    from l2o.learned import OrthoMLPLOpt

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(6, 4), "out": torch.nn.Linear(4, 3)})
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    lopt = OrthoMLPLOpt(vector_keys=["emb.weight"])
    rule = lopt.rule(lopt.init_meta(torch.Generator().manual_seed(0)))
    named = {k: p.detach().clone() for k, p in model.named_parameters()}
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    expected, _ = rule.update(grads, rule.init(named), named, step=0)

    by_name, by_position = copy.deepcopy(model), copy.deepcopy(model)
    for copied in (by_name, by_position):
        for k, p in copied.named_parameters():
            p.grad = grads[k].clone()
    RuleOptimizer(by_name.named_parameters(), rule).step()
    RuleOptimizer(by_position.parameters(), rule).step()
    for k, p in by_name.named_parameters():
        torch.testing.assert_close(p.detach() - named[k], expected[k])
    moved = dict(by_position.named_parameters())["emb.weight"].detach() - named["emb.weight"]
    assert not torch.allclose(moved, expected["emb.weight"])
