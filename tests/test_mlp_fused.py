"""The fused, blocked step of the ``mlp`` learned optimizer against its reference (the oracle)."""

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

from l2o.learned import MLPLOpt
from l2o.learned.mlp_fused import CHUNK_SIZE, feature_slices

# 0-D, 1-D, matrices with and without a size-1 dim, conv 4-D, factored dims that are not leading
# (4-D with dims (2, 3), 3-D with a dim between them), sizes that no block size divides.
SHAPES = [(), (1,), (7,), (5, 3), (1, 9), (33, 17), (4, 1, 3), (3, 8, 5, 5), (6, 5, 4)]
SHAPES += [(2, 3, 4, 5), (3, 7, 2, 9)]
BLOCK_SIZES = [1, 7, 40, CHUNK_SIZE]


def rules(lopt: MLPLOpt, meta, block_size: int):
    rule = lopt.rule(meta, lr=3.0)
    return rule, dataclasses.replace(rule, chunk_size=block_size)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("learn_decays", [False, True])
def test_fused_step_equals_the_reference_on_tensors_of_every_shape(block_size, learn_decays):
    lopt = MLPLOpt(learn_decays=learn_decays)
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    reference, fused = rules(lopt, meta, block_size)
    assert_fused_trajectory_equals_reference(reference, fused, SHAPES, rtol=1e-5, atol_scale=1e-6)


def test_update_takes_the_fused_path_only_above_the_block_size(monkeypatch):
    lopt = MLPLOpt()
    rule = lopt.rule(lopt.init_meta(torch.Generator().manual_seed(0)))
    rule = dataclasses.replace(rule, chunk_size=20)
    assert shapes_sent_to("_tensor_update_fused", rule, monkeypatch) == [(3, 7), (21,)]
    # Inside a compiled graph (the unrolls' compiled truncations) every tensor is fused.
    seen = shapes_sent_to("_tensor_update_fused", rule, monkeypatch, compiled=True)
    assert sorted(seen) == [(3, 7), (4, 5), (21,)]


def test_fused_step_on_non_contiguous_tensors_and_low_precision_params():
    lopt = MLPLOpt()
    meta = lopt.init_meta(torch.Generator().manual_seed(0))
    reference, fused = rules(lopt, meta, 16)
    base = torch.randn(12, 10)
    params = {"t": base.T, "strided": torch.randn(9, 8)[::2, 1:], "bf16": torch.randn(6, 7)}
    params["bf16"] = params["bf16"].to(torch.bfloat16)
    grads = {"t": torch.randn(12, 10).T, "strided": torch.randn(5, 7), "bf16": params["bf16"] * 2}
    assert not params["t"].is_contiguous() and not grads["t"].is_contiguous()
    state = reference.init(params)
    u_ref, s_ref = reference.reference_update(grads, state, params, step=2)
    u_fused, s_fused = fused.fused_update(grads, state, params, step=2)
    assert {k: u.dtype for k, u in u_fused.items()} == {k: p.dtype for k, p in params.items()}
    assert_trees_close(u_fused, u_ref, rtol=1e-5, atol=1e-6 * max_abs(u_ref))
    assert_trees_close(s_fused, s_ref, rtol=0, atol=0)


def test_fused_step_vmaps_over_a_population_like_a_python_loop():
    lopt = MLPLOpt()
    rule = dataclasses.replace(
        lopt.rule(lopt.init_meta(torch.Generator().manual_seed(0)), lr=2.0), chunk_size=9
    )
    population = [{"w": torch.randn(6, 5), "b": torch.randn(11)} for _ in range(4)]
    grads = [{k: torch.randn_like(v) for k, v in p.items()} for p in population]
    assert_vmapped_update_equals_loop(
        rule.fused_update, rule.reference_update, rule, population, grads, rtol=1e-5, atol=1e-8
    )


def test_meta_gradients_through_the_fused_step_equal_the_reference():
    names, ref, fused = fused_and_reference_meta_gradients(MLPLOpt(), lr=300.0)
    assert any(float(r.abs().max()) > 0 for r in ref)
    for name, r, f in zip(names, ref, fused, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-9, atol=1e-12, msg=name)


def test_feature_slices_cover_the_reference_columns_once():
    lopt = MLPLOpt()
    widths = {group: len(decays) for group, decays in lopt.decays.items()}
    slices = feature_slices(widths)
    covered = sorted(i for s in slices.values() for i in range(s.start, s.stop))
    assert covered == list(range(lopt.num_features))


def test_chunk_size_must_be_a_positive_integer():
    lopt = MLPLOpt()
    rule = lopt.rule(lopt.init_meta(torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="chunk_size"):
        dataclasses.replace(rule, chunk_size=0)
