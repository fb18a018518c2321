"""The compiled per-coordinate step of ``ortho_mlp`` (``compile=True``) against its reference:
shapes, options, the drop-in optimizer, and the eager fallback where compilation fails."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from _rule_trajectories import assert_trees_close, max_abs, trajectory
from torch import nn

from l2o.learned import OrthoMLPLOpt, ortho_lopt
from l2o.learned.optimizer import LearnedOptimizer

# Inductor compiles C++ on CPU; without a compiler the optimizer warns and runs eagerly (tested
# below), and there is no compiled step to compare.
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler"
)

# 0-D, 1-D, matrices with and without a size-1 dim, tall and wide, conv 4-D, sizes that no block
# size divides, and a tensor larger than a block.
SHAPES = [(), (1,), (7,), (5, 3), (1, 9), (9, 1), (33, 17), (3, 8, 5, 5), (6, 5, 4), (150, 130)]
# One shape per graph the compiled function holds for a flag set (0-D, a vector, matrices with a
# size-1 dim, a small and a large matrix): the other shapes above share these graphs, and under
# the other option sets each would only add its compilation time.
GRAPH_SHAPES = [(), (7,), (1, 9), (9, 1), (3, 8, 5, 5), (150, 130)]
OPTIONS = [
    {
        "step_timescales": [10.0, 1e3],
        "hidden_sizes": [5],
        "momentum_decays": [0.9],
        "base_momentum": 0,
        "step_scale": "adam_rms",
    },
    {"parameter_feature": False, "mask_unseen": True, "step_scale": "adam_rms"},
]


def make_rule(**config):
    lopt = OrthoMLPLOpt(**config)
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    # Larger output weights than at initialisation, so that the MLP's share of u is not small.
    meta = {k: 3 * v if k.startswith("w") else v for k, v in meta.items()}
    return lopt.rule(meta, lr=2.0)


def assert_compiled_trajectory_equals_reference(rule, params):
    compiled = rule.replace(compiled=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compilation would warn and run eagerly
        got = trajectory(compiled.update, compiled, params)
    expected = trajectory(rule.reference_update, rule, params)
    for (u_ref, s_ref), (u_got, s_got) in zip(expected, got, strict=True):
        assert_trees_close(u_got, u_ref, rtol=1e-4, atol=1e-5 * max_abs(u_ref))
        # The same elementwise ops, which a compiler may contract into fused multiply-adds: a
        # momentum that nearly cancels keeps only the rounding of its larger terms.
        for slot in ("m", "v"):
            for name, expected_slot in s_ref[slot].items():
                torch.testing.assert_close(
                    s_got[slot][name],
                    expected_slot,
                    rtol=1e-5,
                    atol=1e-6 * float(expected_slot.abs().max()),
                )


def _random_params(shapes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}


@needs_compiler
def test_compiled_step_equals_the_reference_on_tensors_of_every_shape():
    assert_compiled_trajectory_equals_reference(make_rule(), _random_params(SHAPES))
    assert ortho_lopt._compile_failure is None


@needs_compiler
@pytest.mark.parametrize("options", OPTIONS, ids=",".join)
def test_compiled_step_equals_the_reference_under_each_option(options):
    assert_compiled_trajectory_equals_reference(make_rule(**options), _random_params(GRAPH_SHAPES))
    assert ortho_lopt._compile_failure is None


@needs_compiler
def test_compiled_step_on_non_contiguous_tensors():
    params = {"t": torch.randn(12, 10).T, "strided": torch.randn(9, 8)[::2, 1:]}
    assert not params["t"].is_contiguous() and not params["strided"].is_contiguous()
    assert_compiled_trajectory_equals_reference(make_rule(), params)


@needs_compiler
def test_matrices_of_any_rank_and_layout_share_one_compiled_graph():
    """Dynamo guards an input on its strides, and a view on its base's: the tensors are handed
    to the graph as contiguous non-views, or each rank and layout would compile its own, and
    the second step (whose state tensors are views of other bases) would compile again."""
    from torch._dynamo.utils import counters

    params = {
        "matrix": torch.randn(33, 17),
        "three_d": torch.randn(6, 5, 4),
        "conv": torch.randn(3, 8, 5, 5),
        "transposed": torch.randn(12, 10).T,
        "strided": torch.randn(9, 8)[::2, 1:],
    }
    rule = make_rule().replace(compiled=True)
    torch._dynamo.reset()
    before = counters["stats"]["unique_graphs"]
    state = rule.init(params)
    for step in range(2):  # the second step's state: views of other bases than the first's
        _, state = rule.update(params, state, params, step=torch.tensor(step))
    assert counters["stats"]["unique_graphs"] - before == 1


def _training_updates(**kwargs) -> tuple[list[torch.Tensor], LearnedOptimizer]:
    """Three steps of the shipped ``ortho_adamw_vectors`` on a small MLP; the last updates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 3))
    opt = LearnedOptimizer(model.parameters(), checkpoint="ortho_adamw_vectors", **kwargs)
    x, y = torch.randn(64, 20, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)], opt


@needs_compiler
def test_drop_in_compile_gives_the_eager_updates_under_the_same_identity():
    eager, eager_opt = _training_updates()
    compiled, compiled_opt = _training_updates(compile=True)
    assert compiled_opt.rule.compiled and not eager_opt.rule.compiled
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert compiled_opt.learned.id == eager_opt.learned.id  # state moves between the two
    compiled_opt.load_state_dict(eager_opt.state_dict())


def test_compile_is_refused_for_an_architecture_without_a_compiled_step():
    params = [nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match=r"checkpoint mlp-\w+ \(mlp\) has no compiled step"):
        LearnedOptimizer(params, checkpoint="mlp_2x32", compile=True)
    with pytest.raises(ValueError, match="compile must be true or false"):
        LearnedOptimizer(params, compile="yes")


def test_a_failed_compilation_warns_once_and_every_step_runs_eagerly(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(ortho_lopt, "compiled_coordinates", broken)
    monkeypatch.setattr(ortho_lopt, "_compile_failure", None)
    eager, _ = _training_updates()
    with pytest.warns(UserWarning, match="compiled step failed.*no C\\+\\+ compiler") as caught:
        fallen_back, _ = _training_updates(compile=True)
    assert len(caught) == 1 and len(calls) == 1  # not retried on every tensor and step
    for a, b in zip(fallen_back, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_guarded_optimizer_takes_compile_for_its_learned_candidate():
    from l2o import GuardedLearnedOptimizer

    opt = GuardedLearnedOptimizer([nn.Parameter(torch.zeros(3, 2))], compile=True)
    assert opt.rule.learned.compiled
