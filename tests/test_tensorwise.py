"""Tensorwise rules (``UpdateRule.tensorwise``): the ``torch.optim`` adapter applies them one
tensor at a time, with the same result as the whole model at once, and drops each tensor's old
state before the next tensor's update."""

from __future__ import annotations

import weakref

import pytest
import torch

import l2o
from l2o.learned import MLPLOpt, OrthoMLPLOpt
from l2o.optim import RuleOptimizer, get


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3)
    )


def _train(opt, model, steps=4):
    x = torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


@pytest.mark.parametrize("checkpoint", ["mlp_2x32", "ortho_mlp"])
def test_a_tensorwise_step_equals_the_whole_model_step(checkpoint, monkeypatch):
    model = _model()
    opt = l2o.LearnedOptimizer(model.parameters(), checkpoint=checkpoint)
    assert opt.rule.tensorwise()
    by_tensor, by_tensor_state = _train(opt, model)
    monkeypatch.setattr(type(opt.rule), "tensorwise", lambda self: False)
    model = _model()
    whole, whole_state = _train(
        l2o.LearnedOptimizer(model.parameters(), checkpoint=checkpoint), model
    )
    for a, b in zip(by_tensor, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p, state in whole_state["state"].items():
        for slot, value in state.items():
            torch.testing.assert_close(by_tensor_state["state"][p][slot], value, rtol=0, atol=0)


def _calls(rule_type, monkeypatch):
    seen = []
    original = rule_type.update

    def spy(self, grads, *args, **kwargs):
        seen.append(sorted(grads))
        return original(self, grads, *args, **kwargs)

    monkeypatch.setattr(rule_type, "update", spy)
    return seen


def test_the_adapter_calls_a_tensorwise_rule_once_per_tensor_and_others_once(monkeypatch):
    lopt = MLPLOpt()
    learned = lopt.rule(lopt.init_meta(torch.Generator().manual_seed(0)))
    seen = _calls(type(learned), monkeypatch)
    model = _model()
    _train(RuleOptimizer(model.parameters(), learned), model, steps=1)
    assert seen == [["0"], ["1"], ["2"], ["3"]]
    adam = get("adam", lr=1e-3)
    assert not adam.tensorwise()
    seen = _calls(type(adam), monkeypatch)
    model = _model()
    _train(RuleOptimizer(model.parameters(), adam), model, steps=1)
    assert seen == [["0", "1", "2", "3"]]


def test_an_ortho_rule_with_a_hand_designed_vector_rule_is_not_tensorwise():
    # AdamW's state is not declared tensorwise, so neither is the composite.
    assert not OrthoMLPLOpt(vector_rule="adamw").rule({}).tensorwise()
    assert OrthoMLPLOpt().rule({}).tensorwise()
    assert not l2o.GuardedLearnedOptimizer(_model().parameters()).rule.tensorwise()


def test_each_tensors_old_state_is_released_before_the_next_tensor_is_updated(monkeypatch):
    # What bounds a tensorwise step's transient memory: when tensor k is updated, the old
    # state of the tensors before it is no longer referenced by the optimizer.
    lopt = MLPLOpt()
    rule = lopt.rule(lopt.init_meta(torch.Generator().manual_seed(0)))
    model = _model()
    opt = RuleOptimizer(model.parameters(), rule)
    _train(opt, model, steps=1)
    params = list(model.parameters())
    old_first_state = weakref.ref(opt.state[params[0]]["m"])
    alive_when_last_updated = []
    original = type(rule).update

    def spy(self, grads, *args, **kwargs):
        if sorted(grads) == [str(len(params) - 1)]:
            alive_when_last_updated.append(old_first_state() is not None)
        return original(self, grads, *args, **kwargs)

    monkeypatch.setattr(type(rule), "update", spy)
    _train(opt, model, steps=1)
    assert alive_when_last_updated == [False]
