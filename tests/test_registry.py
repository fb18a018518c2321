"""l2o.registry.Registry: the one lookup behind every named collection."""

from __future__ import annotations

import pytest

from l2o.registry import Registry


def test_lookup_register_alias_and_errors():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    reg.alias("a", "alpha")
    assert reg["alpha"] == reg["a"] == 1 and "a" in reg and "gamma" not in reg
    assert list(reg) == ["alpha", "beta"] and len(reg) == 2 and dict(reg) == {"alpha": 1, "beta": 2}
    assert reg.names(aliases=True) == ("a", "alpha", "beta")
    with pytest.raises(ValueError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); kn"):
        reg["alpah"]
    with pytest.raises(ValueError, match="known widgets: a, alpha, beta"):
        reg[3]
    obj = object()
    reg.register("same", obj)
    reg.register("same", obj)  # the same object again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        reg.register("same", object())
    reg.register("same", 5, overwrite=True)
    copy = reg.copy()
    copy.unregister("alpha")
    assert "alpha" in reg and "alpha" not in copy and "a" not in copy


def test_every_named_collection_is_a_registry():
    from l2o.learned import registry as learned
    from l2o.meta.estimators import ESTIMATORS
    from l2o.meta.losses import META_LOSSES
    from l2o.optim import registry as optim
    from l2o.optim import schedules
    from l2o.tasks import families, suites
    from l2o.tasks import registry as tasks

    collections = [
        optim._REGISTRY,
        learned._REGISTRY,
        tasks._TASKS,
        families._FAMILIES,
        suites._SUITES,
        schedules._SCHEDULES,
        ESTIMATORS,
        META_LOSSES,
    ]
    assert all(isinstance(c, Registry) for c in collections)
    assert len({c.kind for c in collections}) == len(collections)
