"""The hand-designed rules against torch.optim, under vmap, and under meta-differentiation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.func import functional_call, grad, vmap

import l2o.optim as O
from l2o.guard import GuardRule
from l2o.optim import apply_updates, registry, rules
from l2o.optim.gradient_free import RandomSearch
from l2o.optim.newton import Newton
from l2o.optim.wrappers import SAM

STEPS = 60


@pytest.fixture(autouse=True)
def _float64():
    # torch.optim keeps some scalars (NAdam's mu_product) in the default dtype.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# (twin in torch.optim, l2o class, l2o rule, hyper-parameters)
PARITY = {
    "sgd": ("SGD", O.SGD, rules.SGD, dict(lr=0.1)),
    "sgd-momentum": ("SGD", O.SGD, rules.SGD, dict(lr=0.05, momentum=0.9)),
    "sgd-dampening": ("SGD", O.SGD, rules.SGD, dict(lr=0.05, momentum=0.8, dampening=0.3)),
    "sgd-nesterov": ("SGD", O.SGD, rules.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd-weight-decay": (
        "SGD",
        O.SGD,
        rules.SGD,
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.05),
    ),
    "adagrad": ("Adagrad", O.Adagrad, rules.Adagrad, dict(lr=0.05)),
    "adagrad-decays": (
        "Adagrad",
        O.Adagrad,
        rules.Adagrad,
        dict(lr=0.05, lr_decay=0.02, weight_decay=0.05, initial_accumulator_value=0.1),
    ),
    "adadelta": ("Adadelta", O.Adadelta, rules.Adadelta, dict(lr=1.0, rho=0.8, weight_decay=0.05)),
    "rmsprop": ("RMSprop", O.RMSprop, rules.RMSprop, dict(lr=2e-3)),
    "rmsprop-centered": ("RMSprop", O.RMSprop, rules.RMSprop, dict(lr=2e-3, centered=True)),
    "rmsprop-momentum": ("RMSprop", O.RMSprop, rules.RMSprop, dict(lr=1e-3, momentum=0.8)),
    "rmsprop-centered-momentum": (
        "RMSprop",
        O.RMSprop,
        rules.RMSprop,
        dict(lr=1e-3, alpha=0.9, momentum=0.8, centered=True, weight_decay=0.05),
    ),
    "adam": ("Adam", O.Adam, rules.Adam, dict(lr=1e-2)),
    "adam-weight-decay": (
        "Adam",
        O.Adam,
        rules.Adam,
        dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.05),
    ),
    "adamw": ("AdamW", O.AdamW, rules.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam-amsgrad": ("Adam", O.Adam, rules.Adam, dict(lr=1e-2, amsgrad=True)),
    "amsgrad": ("Adam", O.AMSGrad, rules.AMSGrad, dict(lr=1e-2, amsgrad=True, weight_decay=0.05)),
    "adamax": ("Adamax", O.Adamax, rules.Adamax, dict(lr=1e-2, weight_decay=0.05)),
    "nadam": ("NAdam", O.NAdam, rules.NAdam, dict(lr=1e-2, momentum_decay=0.01)),
    "nadam-weight-decay": ("NAdam", O.NAdam, rules.NAdam, dict(lr=1e-2, weight_decay=0.05)),
    "nadamw": (
        "NAdam",
        O.NAdam,
        rules.NAdam,
        dict(lr=1e-2, weight_decay=0.05, decoupled_weight_decay=True),
    ),
}


def _problem():
    """A 2-layer tanh MLP on fixed random regression data (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = torch.sin(x @ torch.randn(4, 2, generator=g))
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return model, x, y


def _torch_run(name, hparams):
    model, x, y = _problem()
    opt = getattr(torch.optim, name)(model.parameters(), foreach=False, **hparams)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return dict(model.named_parameters())


def _assert_matches(ours, reference):
    for k, expected in reference.items():
        torch.testing.assert_close(ours[k].detach(), expected.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", PARITY)
def test_optimizer_class_matches_torch_optim_twin_over_60_steps(case):
    twin, cls, _, hparams = PARITY[case]
    model, x, y = _problem()
    opt = cls(model.parameters(), **hparams)
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    _assert_matches(dict(model.named_parameters()), _torch_run(twin, hparams))


@pytest.mark.parametrize("case", PARITY)
def test_pure_rule_in_functional_loop_matches_torch_optim_twin(case):
    twin, _, rule_cls, hparams = PARITY[case]
    model, x, y = _problem()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    rule = rule_cls(**hparams)
    state = rule.init(params)
    for t in range(STEPS):
        updates, state = rule.update(grad(loss)(params), state, params, step=t)
        params = apply_updates(params, updates)
    _assert_matches(params, _torch_run(twin, hparams))


FIRST_ORDER = [n for n in O.names() if not O.get(n).needs_loss_fn]
# The first-order rules with a torch.optim namesake (the others: INNA, the wrappers).
TORCH_TWINS = {"momentum": "SGD", "nesterov": "SGD", "amsgrad": "Adam"}
TWINNED = [
    n for n in FIRST_ORDER if hasattr(torch.optim, TORCH_TWINS.get(n, type(O.get(n)).__name__))
]
# Every rule that needs nothing but a loss function of the parameters.
PLAIN_LOSS = [n for n in O.names() if not O.get(n).loss_fn_requirements()]


def _with_weight_decay(name, value, **hparams):
    # Weight decay exercises one more branch where a rule has it.
    if "weight_decay" in registry._entry(name).rule_cls.hyperparameter_names():
        hparams["weight_decay"] = value
    return O.get(name, **hparams)


VMAP_HPARAMS = {
    "adagrad": dict(lr_decay=0.1),
    "rmsprop": dict(centered=True, momentum=0.5),
    # bfloat16 matmuls round differently batched and one by one; the rule is the same.
    "muon": dict(ns_dtype="float64"),
}


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_vmapped_rule_over_8_tasks_at_different_steps_equals_python_loop(name):
    rule = _with_weight_decay(name, 0.01, lr=0.01, **VMAP_HPARAMS.get(name, {}))
    g = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(8, 5, 3, generator=g), "b": torch.randn(8, 3, generator=g)}
    targets = torch.randn(8, 3, generator=g)
    start = torch.arange(8)  # task i is at step i: SGD's first-step branch differs per task

    def loss(p, target):
        return ((torch.tanh(p["w"]).sum(0) + p["b"] - target) ** 2).sum()

    def one_step(p, s, target, step):
        updates, s = rule.update(grad(loss)(p, target), s, p, step=step)
        return apply_updates(p, updates), s

    batched, state = params, vmap(rule.init)(params)
    for t in range(4):
        batched, state = vmap(one_step)(batched, state, targets, start + t)

    for i in range(8):
        p = {k: v[i] for k, v in params.items()}
        s = rule.init(p)
        for t in range(4):
            p, s = one_step(p, s, targets[i], start[i] + t)
        for k in p:
            torch.testing.assert_close(batched[k][i], p[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", FIRST_ORDER)
def test_tensor_step_gives_the_same_update_as_int_step(name):
    rule = O.get(name, lr=0.01)
    params = {"w": torch.randn(6, dtype=torch.float32)}
    state_int = state_tensor = rule.init(params)
    for t in range(3):
        grads = {"w": torch.randn(6, dtype=torch.float32)}
        u_int, state_int = rule.update(grads, state_int, params, step=t)
        u_tensor, state_tensor = rule.update(grads, state_tensor, params, step=torch.tensor(t))
        assert u_tensor["w"].dtype == torch.float32
        torch.testing.assert_close(u_tensor["w"], u_int["w"])
    for a, b in zip(_leaves(state_int), _leaves(state_tensor)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _adam_meta_gradient(eps_root):
    """d(final loss)/d(lr) through 5 Adam steps on a loss with one coordinate whose gradient
    is exactly zero."""
    lr = torch.tensor(0.1, requires_grad=True)
    weights = torch.tensor([1.0, 2.0, 0.0])  # the third coordinate does not move the loss

    def loss(p):
        return (weights * (p["w"] - 1.0) ** 2).sum()

    rule = rules.Adam(lr=lr, eps_root=eps_root)
    params = {"w": torch.tensor([0.5, -0.3, 0.2])}
    state = rule.init(params)
    for t in range(5):
        updates, state = rule.update(grad(loss)(params), state, params, step=t)
        params = apply_updates(params, updates)
    (meta_grad,) = torch.autograd.grad(loss(params), lr)
    return meta_grad


def test_adam_eps_root_keeps_meta_gradient_finite_where_plain_adam_is_nan():
    assert not torch.isfinite(_adam_meta_gradient(eps_root=0.0))
    meta_grad = _adam_meta_gradient(eps_root=1e-8)
    assert torch.isfinite(meta_grad) and meta_grad != 0


def test_adam_eps_root_changes_the_update_only_by_the_root_offset():
    g = {"w": torch.tensor([1e-3, 0.0, -2.0])}
    params = {"w": torch.zeros(3)}
    plain, _ = rules.Adam(lr=1.0).update(g, rules.Adam().init(params), params, step=0)
    rooted, _ = rules.Adam(lr=1.0, eps_root=1e-12).update(
        g, rules.Adam().init(params), params, step=0
    )
    torch.testing.assert_close(rooted["w"], plain["w"], rtol=1e-5, atol=0)


def test_rule_with_a_schedule_as_lr_uses_the_schedule_at_each_step():
    params, grads = {"w": torch.ones(2)}, {"w": torch.ones(2)}
    rule = rules.SGD(lr=lambda step: 0.1 * (step + 1))
    for t in range(3):
        updates, _ = rule.update(grads, {}, params, step=t)
        torch.testing.assert_close(updates["w"], torch.full((2,), -0.1 * (t + 1)))


def test_rules_are_pure_inputs_unchanged_and_state_keeps_shape_and_dtype():
    params = {"a": torch.randn(3, 2), "b": torch.randn(4)}

    def loss(p):
        return sum(((v - 1) ** 2).sum() for v in p.values())

    grads = grad(loss)(params)
    for name in PLAIN_LOSS:
        rule = _with_weight_decay(name, 0.1)
        state = rule.init(params)
        before = [t.clone() for t in (*params.values(), *grads.values(), *_leaves(state))]
        _, new_state = rule.update(grads, state, params, step=0, loss_fn=loss)
        after = [*params.values(), *grads.values(), *_leaves(state)]
        assert all(torch.equal(x, y) for x, y in zip(before, after)), name
        assert [(t.shape, t.dtype) for t in _leaves(new_state)] == [
            (t.shape, t.dtype) for t in _leaves(state)
        ], name


BAD_HPARAMS = [
    (rules.SGD, dict(lr=-0.1), "lr"),
    (rules.SGD, dict(lr=math.nan), "lr"),
    (rules.SGD, dict(momentum=-0.5), "momentum"),
    (rules.SGD, dict(dampening=1.5), "dampening"),
    (rules.SGD, dict(weight_decay=math.inf), "weight_decay"),
    (rules.SGD, dict(nesterov=True), "nesterov"),
    (rules.SGD, dict(momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
    (rules.SGD, dict(nesterov="yes"), "nesterov"),
    (rules.Adagrad, dict(lr_decay=-1.0), "lr_decay"),
    (rules.Adagrad, dict(initial_accumulator_value=-1.0), "initial_accumulator_value"),
    (rules.Adagrad, dict(eps=math.nan), "eps"),
    (rules.Adadelta, dict(rho=1.5), "rho"),
    (rules.RMSprop, dict(alpha=-0.1), "alpha"),
    (rules.RMSprop, dict(momentum=math.inf), "momentum"),
    (rules.RMSprop, dict(centered=1), "centered"),
    (rules.Adam, dict(betas=(1.0, 0.999)), "betas[0]"),
    (rules.Adam, dict(betas=(0.9, -0.1)), "betas[1]"),
    (rules.Adam, dict(betas=(0.9,)), "betas"),
    (rules.Adam, dict(eps=-1e-8), "eps"),
    (rules.Adam, dict(eps_root=math.nan), "eps_root"),
    (rules.Adam, dict(amsgrad=None), "amsgrad"),
    (rules.AdamW, dict(weight_decay=-0.01), "weight_decay"),
    (rules.Adamax, dict(betas=(0.9, math.inf)), "betas[1]"),
    (rules.NAdam, dict(momentum_decay=-1.0), "momentum_decay"),
    (rules.NAdam, dict(lr="fast"), "lr"),
]


@pytest.mark.parametrize(("rule_cls", "hparams", "field"), BAD_HPARAMS)
def test_invalid_hyperparameter_raises_value_error_naming_it(rule_cls, hparams, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        rule_cls(**hparams)
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        rule_cls().replace(**hparams)


def test_betas_from_a_list_become_a_tuple():
    assert rules.Adam(betas=[0.8, 0.9]).betas == (0.8, 0.9)


def test_field_names_are_torch_optim_hyperparameter_names():
    for name in TWINNED:
        rule = O.get(name)
        twin_cls = getattr(torch.optim, TORCH_TWINS.get(name, type(rule).__name__))
        shape = (2, 2) if name == "muon" else (1,)  # torch.optim.Muon takes matrices only
        torch_defaults = twin_cls([torch.zeros(shape, requires_grad=True)]).defaults
        # l2o's own additions: eps_root (Adam), and Muon's rule for non-matrices and NS dtype.
        extra = {"eps_root", "ns_dtype", "other", "matrix_keys"}
        fields = {f.name for f in dataclasses.fields(rule)} - extra
        assert fields <= set(torch_defaults), name


def test_rules_built_inside_vmap_over_a_population_of_learning_rates():
    """A learning-rate sweep as one vmapped population (tensor hyper-parameters are not
    range-checked, so rules can be built inside the transform)."""
    from l2o.optim import get

    lrs = torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64)
    params = {"w": torch.ones(4, dtype=torch.float64)}
    grads = {"w": torch.arange(4, dtype=torch.float64)}

    def one(lr):
        rule = get("adam", lr=lr)
        updates, _ = rule.update(grads, rule.init(params), params, step=0)
        return updates["w"]

    swept = torch.func.vmap(one)(lrs)
    for i, lr in enumerate(lrs.tolist()):
        torch.testing.assert_close(swept[i], one(torch.tensor(lr, dtype=torch.float64)))
    torch.testing.assert_close(swept[2], -0.1 * torch.sign(grads["w"]), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("build", "flag"),
    [
        (lambda v: rules.SGD(lr=0.1, momentum=0.9, nesterov=v), "nesterov"),
        (lambda v: SAM(base=rules.SGD(lr=0.1), adaptive=v), "adaptive"),
        (lambda v: RandomSearch(adapt_sigma=v), "adapt_sigma"),
        (lambda v: Newton(adapt_damping=v), "adapt_damping"),
        (lambda v: GuardRule(learned=rules.Adam(), fallback=rules.SGD(), shadow=v), "shadow"),
        (lambda v: GuardRule(learned=rules.Adam(), fallback=rules.SGD(), deferred=v), "deferred"),
    ],
)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_switches_refuse_anything_but_a_bool(build, flag, value) -> None:
    # A truthy string or 1 from a config would otherwise switch a feature on silently.
    with pytest.raises(ValueError, match=f"{flag} must be True or False"):
        build(value)
    build(True)
    build(False)
