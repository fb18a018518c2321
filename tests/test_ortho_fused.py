"""The blocked direction of the ``ortho_mlp`` learned optimizer against its reference (the whole
input matrix): shapes, block sizes, options, vmap and meta-gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _rule_trajectories import (
    assert_fused_trajectory_equals_reference,
    assert_trees_close,
    assert_vmapped_update_equals_loop,
    fused_and_reference_meta_gradients,
    max_abs,
    shapes_sent_to,
)

from l2o.learned import OrthoMLPLOpt
from l2o.learned.mlp_fused import CHUNK_SIZE

# 0-D, 1-D, matrices with and without a size-1 dim, tall and wide, conv 4-D, sizes that no block
# size divides.
SHAPES = [(), (1,), (7,), (5, 3), (1, 9), (9, 1), (33, 17), (4, 1, 3), (3, 8, 5, 5), (6, 5, 4)]
BLOCK_SIZES = [1, 7, 40, CHUNK_SIZE]
OPTIONS = [
    {},
    {"step_scale": "adam_rms", "weight_decay": 0.1},
    {"step_scale": "adam_rms", "step_scale_momentum": 2, "base_momentum": 0},
    {
        "step_timescales": [10.0, 1e3],
        "hidden_sizes": [5],
        "momentum_decays": [0.9],
        "base_momentum": 0,
    },
    {"vector_keys": ["t4"], "matrix_scaling": "match_rms_adamw"},
    {"parameter_feature": False, "mask_unseen": True, "step_scale": "adam_rms"},
]


def make_rule(dtype=torch.float32, lr=2.0, **config):
    lopt = OrthoMLPLOpt(ns_dtype="float64" if dtype == torch.float64 else "float32", **config)
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    # Larger output weights than at initialisation, so that the MLP's share of u is not small.
    meta = {k: (3 * v if k.startswith("w") else v).to(dtype) for k, v in meta.items()}
    return lopt.rule(meta, lr=lr)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_fused_direction_equals_the_reference_on_tensors_of_every_shape(block_size, options):
    rule = make_rule(**options)
    fused = dataclasses.replace(rule, chunk_size=block_size)
    assert_fused_trajectory_equals_reference(rule, fused, SHAPES, rtol=1e-4, atol_scale=1e-5)


def test_update_takes_the_fused_path_only_above_the_block_size(monkeypatch):
    rule = dataclasses.replace(make_rule(), chunk_size=20)
    assert shapes_sent_to("_direction_fused", rule, monkeypatch) == [(3, 7), (21,)]


def test_update_inside_a_compiled_graph_takes_the_fused_path_for_every_tensor(monkeypatch):
    """The meta-training unrolls' compiled truncations trace ``update``; there every tensor
    takes the feature-major form, the faster one under Inductor (BENCHMARKS.md)."""
    rule = dataclasses.replace(make_rule(), chunk_size=20)
    seen = shapes_sent_to("_direction_fused", rule, monkeypatch, compiled=True)
    assert sorted(seen) == [(3, 7), (4, 5), (21,)]


def test_update_inside_a_compiled_and_differentiated_graph_traces_the_scalar_form(monkeypatch):
    """TBPTT's compiled steps differentiate the update with respect to the meta-parameters;
    there every tensor takes :func:`coordinates` (the scalar-weighted MLP, whose backward
    Inductor fuses), not the feature-major form (BENCHMARKS.md)."""
    rule = dataclasses.replace(make_rule(), chunk_size=20)
    meta = {k: v.clone().requires_grad_() for k, v in rule.meta_params.items()}
    rule = dataclasses.replace(rule, meta_params=meta)
    seen = shapes_sent_to("_coordinates_traced", rule, monkeypatch, compiled=True)
    assert sorted(seen) == [(3, 7), (4, 5), (21,)]
    assert shapes_sent_to("_direction_fused", rule, monkeypatch, compiled=True) == []
    # Eagerly, or where no meta-gradient is recorded, the form is not used.
    assert shapes_sent_to("_coordinates_traced", rule, monkeypatch) == []
    with torch.no_grad():
        assert shapes_sent_to("_coordinates_traced", rule, monkeypatch, compiled=True) == []


@pytest.mark.parametrize(
    "options", [*OPTIONS, {"mask_unseen": True}], ids=lambda o: ",".join(o) or "defaults"
)
def test_the_traced_form_gives_the_eager_updates_and_meta_gradients(options):
    """What TBPTT's compiled steps differentiate: two updates traced under ``torch.compile``
    (the scalar-weighted form) against the eager rule, values and meta-gradients, on tensors of
    several ranks and one that is all zeros and never gets a gradient (where a ``p·rsqrt``
    input would put NaN in the meta-gradient)."""
    g = torch.Generator().manual_seed(1)
    base = make_rule(**options)
    meta = {k: v.clone().requires_grad_() for k, v in base.meta_params.items()}
    rule = dataclasses.replace(base, meta_params=meta)
    shapes = {"w": (5, 3), "t4": (4, 1, 3), "v": (7,), "s": ()}
    params = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    params["zero"] = torch.zeros(6, 4)
    grads = [{k: torch.randn_like(p) for k, p in params.items()} for _ in range(2)]
    for step_grads in grads:
        step_grads["zero"] = torch.zeros(6, 4)

    def two_steps(params):
        state = rule.init(params)
        for step, step_grads in enumerate(grads):
            updates, state = rule.update(step_grads, state, params, step=step)
            params = {k: p + updates[k] for k, p in params.items()}
        return params

    def result_and_meta_gradients(fn):
        final = fn(params)
        loss = sum((p * p).sum() for p in final.values())
        found = torch.autograd.grad(loss, list(meta.values()), allow_unused=True)
        return final, [
            torch.zeros_like(m) if d is None else d for m, d in zip(meta.values(), found)
        ]

    eager = result_and_meta_gradients(two_steps)
    traced = result_and_meta_gradients(torch.compile(two_steps, backend="eager", fullgraph=True))
    assert all(torch.isfinite(d).all() for d in traced[1])
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)


def test_fused_direction_on_non_contiguous_tensors_and_low_precision_params():
    rule = make_rule()
    fused = dataclasses.replace(rule, chunk_size=16)
    params = {"t": torch.randn(12, 10).T, "strided": torch.randn(9, 8)[::2, 1:]}
    params["bf16"] = torch.randn(6, 7).to(torch.bfloat16)
    grads = {"t": torch.randn(12, 10).T, "strided": torch.randn(5, 7), "bf16": params["bf16"] * 2}
    assert not params["t"].is_contiguous() and not grads["t"].is_contiguous()
    state = rule.init(params)
    u_ref, s_ref = rule.reference_update(grads, state, params, step=2)
    u_fused, s_fused = fused.fused_update(grads, state, params, step=2)
    assert {k: u.dtype for k, u in u_fused.items()} == {k: p.dtype for k, p in params.items()}
    for k in ("t", "strided"):
        torch.testing.assert_close(u_fused[k], u_ref[k], rtol=1e-4, atol=1e-5 * max_abs(u_ref))
    # bfloat16 updates: the same up to the parameter dtype's rounding.
    torch.testing.assert_close(u_fused["bf16"], u_ref["bf16"], rtol=2e-2, atol=1e-4)
    assert_trees_close(s_fused, s_ref, rtol=0, atol=0)


def test_fused_direction_vmaps_over_a_population_like_a_python_loop():
    rule = dataclasses.replace(make_rule(step_scale="adam_rms"), chunk_size=9)
    population = [{"w": torch.randn(6, 5), "b": torch.randn(11)} for _ in range(4)]
    grads = [{k: torch.randn_like(v) for k, v in p.items()} for p in population]
    assert_vmapped_update_equals_loop(
        rule.fused_update, rule.reference_update, rule, population, grads, rtol=1e-4, atol=1e-6
    )


def test_meta_gradients_through_the_fused_direction_equal_the_reference():
    lopt = OrthoMLPLOpt(ns_dtype="float64", step_scale="adam_rms", weight_decay=0.1)
    names, ref, fused = fused_and_reference_meta_gradients(lopt, lr=3.0)
    assert all(float(r.abs().max()) > 0 for r in ref)
    for name, r, f in zip(names, ref, fused, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12, msg=name)


def test_chunk_size_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="chunk_size"):
        dataclasses.replace(make_rule(), chunk_size=0)
