"""Optimizers by name, the named classes' signatures, and the configs/optim group."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import l2o.optim as O
from l2o.optim import curvature, newton, quasi_newton, registry, rules

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FIRST_ORDER = {
    "sgd": rules.SGD,
    "momentum": rules.SGD,
    "nesterov": rules.SGD,
    "adagrad": rules.Adagrad,
    "adadelta": rules.Adadelta,
    "rmsprop": rules.RMSprop,
    "adam": rules.Adam,
    "adamw": rules.AdamW,
    "amsgrad": rules.AMSGrad,
    "adamax": rules.Adamax,
    "nadam": rules.NAdam,
}


def test_every_first_order_name_gives_its_rule_and_a_torch_optim_class():
    assert set(FIRST_ORDER) <= set(O.names())
    assert O.names() == sorted(O.names())
    for name, rule_cls in FIRST_ORDER.items():
        assert type(O.get(name)) is rule_cls
        assert issubclass(O.get_class(name), torch.optim.Optimizer)


def test_preset_names_carry_their_defaults_into_rule_and_class():
    assert O.get("momentum") == rules.SGD(momentum=0.9)
    assert O.get("nesterov") == rules.SGD(momentum=0.9, nesterov=True)
    assert O.get("momentum", momentum=0.5, lr=0.1) == rules.SGD(lr=0.1, momentum=0.5)
    assert O.get("amsgrad").amsgrad and O.get("adamw").decoupled_weight_decay
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = O.get_class("nesterov")(params, lr=0.1)
    assert isinstance(opt, O.SGD)
    assert (opt.defaults["momentum"], opt.defaults["nesterov"], opt.defaults["lr"]) == (
        0.9,
        True,
        0.1,
    )


def test_unknown_name_lists_the_known_names_and_suggests_a_close_one():
    with pytest.raises(ValueError, match=r"'rmsporp' \(did you mean 'rmsprop'\?\)") as err:
        O.get("rmsporp")
    for name in FIRST_ORDER:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="known optimizers: adadelta, "):
        O.get_class("no-such-optimizer")


def test_unknown_hyperparameter_for_a_name_raises():
    with pytest.raises(TypeError, match="momentum"):
        O.get("adam", momentum=0.9)


def test_register_adds_a_name_and_refuses_duplicates_and_unknown_defaults(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", registry._REGISTRY.copy())
    O.register("heavy_ball", rules.SGD, O.SGD, momentum=0.99)
    assert "heavy_ball" in O.names()
    assert O.get("heavy_ball").momentum == 0.99
    with pytest.raises(ValueError, match="already registered"):
        O.register("adam", rules.Adam, O.Adam)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        O.register("adam_typo", rules.Adam, O.Adam, beta1=0.9)


NAMED_CLASSES = [
    (O.SGD, rules.SGD),
    (O.Adagrad, rules.Adagrad),
    (O.Adadelta, rules.Adadelta),
    (O.RMSprop, rules.RMSprop),
    (O.Adam, rules.Adam),
    (O.AdamW, rules.AdamW),
    (O.AMSGrad, rules.AMSGrad),
    (O.Adamax, rules.Adamax),
    (O.NAdam, rules.NAdam),
    (O.BFGS, quasi_newton.BFGS),
    (O.ConjugateGradient, quasi_newton.ConjugateGradient),
    (O.Newton, newton.Newton),
    (O.LevenbergMarquardt, newton.LevenbergMarquardt),
    (O.AdaHessian, curvature.AdaHessian),
    (O.Sophia, curvature.Sophia),
    (O.INNA, curvature.INNA),
]


@pytest.mark.parametrize(("cls", "rule_cls"), NAMED_CLASSES, ids=lambda c: c.__name__)
def test_named_class_signature_is_the_rule_fields_with_the_same_defaults(cls, rule_cls):
    signature = inspect.signature(cls.__init__).parameters
    arguments = [(p.name, p.default) for p in list(signature.values())[2:]]
    fields = [(f.name, f.default) for f in dataclasses.fields(rule_cls)]
    assert arguments == fields
    opt = cls([torch.nn.Parameter(torch.zeros(1))])
    assert opt.rule == rule_cls()


@pytest.mark.parametrize("name", O.names())
def test_optim_config_composes_and_instantiates_the_named_rule_with_its_defaults(name):
    assert (CONFIGS / "optim" / f"{name}.yaml").is_file(), f"configs/optim/{name}.yaml is missing"
    has_lr = "lr" in registry._entry(name).rule_cls.hyperparameter_names()
    lr = {"lr": 0.5} if has_lr else {}
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=[f"+optim={name}", *(f"optim.{k}={v}" for k, v in lr.items())])
    rule = instantiate(cfg.optim)
    assert rule == O.get(name, **lr)
    listed = set(cfg.optim) - {"_target_", "_convert_"}
    # Every hyper-parameter, and structure fields (a wrapper's base rule) only as fields.
    assert set(type(rule).hyperparameter_names()) <= listed, (
        "the config lists every hyper-parameter"
    )
    assert listed <= {f.name for f in dataclasses.fields(rule)}


def test_every_optim_config_names_a_registered_optimizer():
    assert sorted(p.stem for p in (CONFIGS / "optim").glob("*.yaml")) == O.names()
