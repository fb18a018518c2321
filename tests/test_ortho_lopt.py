"""The ``ortho_mlp`` learned optimizer: scale invariance, orthogonalised matrix updates against
the SVD, vmap, meta-gradients against finite differences, checkpoints, configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from _rule_trajectories import assert_vmapped_update_equals_loop
from torch import nn

from l2o.learned import OrthoMLPLOpt, get_lopt, load_checkpoint, save_checkpoint
from l2o.learned.optimizer import LearnedOptimizer
from l2o.optim import get as get_rule


def params_of(dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (7, 5), "conv": (4, 3, 3, 3), "b": (5,), "s": ()}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def gradient_sequence(params, steps=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
        for _ in range(steps)
    ]


def run(rule, params, grads_seq, scale=1.0):
    """The updates along a fixed gradient sequence (parameters moved by each update)."""
    state, out = rule.init(params), []
    for t, grads in enumerate(grads_seq):
        updates, state = rule.update(
            {k: scale * g for k, g in grads.items()}, state, params, step=t
        )
        out.append(updates)
        params = {k: params[k] + updates[k] for k in params}
    return out


def make(dtype=torch.float64, **config):
    config.setdefault("ns_dtype", "float64" if dtype == torch.float64 else "float32")
    lopt = OrthoMLPLOpt(**config)
    meta = {k: v.to(dtype) for k, v in lopt.init_meta(torch.Generator().manual_seed(0)).items()}
    return lopt, meta


@pytest.mark.parametrize("step_scale", ["constant", "adam_rms"])
@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_updates_are_unchanged_when_the_loss_is_rescaled(scale, step_scale):
    lopt, meta = make(step_scale=step_scale)
    rule = lopt.rule(meta)
    params = params_of()
    grads = gradient_sequence(params)
    for reference, scaled in zip(run(rule, params, grads), run(rule, params, grads, scale)):
        for k in reference:
            torch.testing.assert_close(scaled[k], reference[k], rtol=1e-9, atol=1e-15)


def test_the_mlp_optimizer_is_not_scale_invariant_which_is_what_this_one_fixes():
    # The regression the new inputs address: the `mlp` optimizer's normalised features fall
    # below its epsilon at small gradient scales, so its updates change with the loss scale.
    mlp = get_lopt("mlp")
    rule = mlp.rule(mlp.init_meta(torch.Generator().manual_seed(0)))
    params = params_of(torch.float32)
    grads = gradient_sequence(params)
    small = run(rule, params, grads, 1e-3)[-1]["w"]
    plain = run(rule, params, grads)[-1]["w"]
    assert not torch.allclose(small, plain, rtol=1e-2)


def _polar_and_singular(matrix):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u, s, vh


def test_matrix_updates_are_orthogonalised_momenta_with_spectral_scaling():
    # With a zero output layer the MLP adds nothing: u = m_0.9 / s, the base direction, and a
    # matrix update is -lr_eff * sqrt(max(1, A/B)) * NS(u).
    lopt, meta = make(output_init_scale=0.0, lr_init=0.01)
    rule = lopt.rule(meta, lr=0.5)
    params = params_of()
    grads = gradient_sequence(params, steps=3)
    state = rule.init(params)
    for t, g in enumerate(grads):
        updates, state = rule.update(g, state, params, step=t)
    for name in ("w", "conv"):
        p = params[name]
        rows, cols = p.shape[0], p[0].numel()
        step = -updates[name].reshape(rows, cols) / (0.5 * 0.01 * math.sqrt(max(1, rows / cols)))
        m = state["m"][name][..., 1]
        v = state["v"][name]
        base = (m / torch.sqrt(v + 1e-8 * v.mean() + 1e-30)).reshape(rows, cols)
        u, singular_base, vh = _polar_and_singular(base)
        _, singular, _ = _polar_and_singular(step)
        # Singular values in Newton–Schulz's band (about [0.7, 1.2]; not exactly 1 by design) ...
        assert float(singular.min()) > 0.6 and float(singular.max()) < 1.25
        # ... with the base direction's singular vectors: Uᵀ·step·V is diagonal.
        core = u.T @ step @ vh.T
        off_diagonal = core - torch.diag(torch.diagonal(core))
        assert float(off_diagonal.abs().max()) < 1e-8
        assert float(singular_base.min()) > 0  # (a well-conditioned input)


def test_vector_updates_have_the_learned_step_size_as_rms():
    lopt, meta = make(lr_init=0.02)
    rule = lopt.rule(meta, lr=2.0)
    params = params_of()
    updates = run(rule, params, gradient_sequence(params, steps=2))[-1]
    for name in ("b", "s"):
        rms = float(torch.sqrt(torch.mean(updates[name] ** 2)))
        assert math.isclose(rms, 2.0 * 0.02, rel_tol=1e-6)  # log_lr initialised in float32


def test_adam_rms_step_scale_shrinks_steps_when_gradients_are_noise():
    """min(1, rms(m_0.9 / s)): about sqrt(0.1 / 1.9) = 0.23 for independent gradients, 1 for a
    constant one; the constant step scale ignores the difference."""
    params = params_of()
    constant_grads = [dict(gradient_sequence(params, steps=1)[0]) for _ in range(200)]
    noise = gradient_sequence(params, steps=200, seed=5)

    def final_rms(step_scale, grads):
        lopt, meta = make(step_scale=step_scale)
        update = run(lopt.rule(meta), params, grads)[-1]["w"]
        return float(update.pow(2).mean().sqrt())

    # (Newton–Schulz leaves singular values in a band, so the constant scale's RMS varies a bit.)
    fixed_noise, fixed_signal = final_rms("constant", noise), final_rms("constant", constant_grads)
    assert fixed_noise == pytest.approx(fixed_signal, rel=0.1)
    ratio = final_rms("adam_rms", noise) / fixed_noise
    assert 0.1 < ratio < 0.45  # the noise floor's sqrt((1 - β)/(1 + β)), per-tensor estimate
    assert final_rms("adam_rms", constant_grads) == pytest.approx(fixed_signal, rel=1e-6)
    # Measured on the slow momentum (β = 0.99) the shrinkage in noise is stronger.
    lopt, meta = make(step_scale="adam_rms", step_scale_momentum=2)
    slow = float(run(lopt.rule(meta), params, noise)[-1]["w"].pow(2).mean().sqrt()) / fixed_noise
    assert slow < ratio


def test_weight_decay_is_decoupled_at_each_tensors_step_size():
    params = params_of()
    grads = gradient_sequence(params, steps=1)
    lopt, meta = make(lr_init=0.02)
    decayed_lopt, _ = make(lr_init=0.02, weight_decay=0.5)
    plain = run(lopt.rule(meta, lr=2.0), params, grads)[0]
    decayed = run(decayed_lopt.rule(meta, lr=2.0), params, grads)[0]
    for k in params:
        kind = "matrix" if params[k].ndim >= 2 else "vector"
        step_size = float(torch.exp(meta[f"log_lr_{kind}"]))  # 0.02, rounded through float32
        expected = plain[k] - 2.0 * step_size * 0.5 * params[k]
        torch.testing.assert_close(decayed[k], expected, rtol=1e-9, atol=1e-12)


def test_without_the_parameter_feature_updates_do_not_depend_on_the_parameters():
    lopt, meta = make(parameter_feature=False, output_init_scale=3.0)
    assert lopt.num_features == 5 and meta["w0"].shape[0] == 5
    grads = gradient_sequence(params_of(), steps=3)
    # run() moves the parameters by each update, so start from two different points.
    first, second = (
        run(lopt.rule(meta), params_of(seed=1), grads),
        run(lopt.rule(meta), params_of(seed=7), grads),
    )
    for a, b in zip(first, second):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-15)
    # With the feature (the default) they do.
    lopt, meta = make(output_init_scale=3.0)
    a, b = (
        run(lopt.rule(meta), params_of(seed=1), grads),
        run(lopt.rule(meta), params_of(seed=7), grads),
    )
    assert not torch.allclose(a[-1]["w"], b[-1]["w"])
    # The option is in the config (and so the identity) only when it is not the default.
    assert "parameter_feature" not in lopt.config()
    assert OrthoMLPLOpt(parameter_feature=False).config()["parameter_feature"] is False


@pytest.mark.parametrize("parameter_feature", [True, False])
def test_mask_unseen_leaves_coordinates_that_never_had_a_gradient(parameter_feature):
    """A column of a matrix, and entries of a vector, whose gradient is always 0: with
    ``mask_unseen`` they get only the weight decay (as under AdamW), without it the MLP's
    constant output moves them."""
    params = params_of()
    grads = gradient_sequence(params, steps=4)
    for g in grads:
        g["w"][:, 2] = 0.0
        g["b"][1:3] = 0.0
    options = dict(parameter_feature=parameter_feature, output_init_scale=3.0, weight_decay=0.1)
    lopt, meta = make(mask_unseen=True, **options)
    # Non-zero biases (meta-trained ones are), so that MLP(0) is not 0.
    g = torch.Generator().manual_seed(3)
    meta = {
        k: torch.randn(v.shape, generator=g, dtype=v.dtype) if k.startswith("b") else v
        for k, v in meta.items()
    }
    assert lopt.config()["mask_unseen"] is True
    masked = run(lopt.rule(meta), params, grads)
    unmasked_lopt, _ = make(**options)
    unmasked = run(unmasked_lopt.rule(meta), params, grads)
    p = dict(params)
    for t, update in enumerate(masked):
        for k, index in [("w", (slice(None), 2)), ("b", slice(1, 3))]:
            kind = "matrix" if k == "w" else "vector"
            decay = -float(torch.exp(meta[f"log_lr_{kind}"])) * 0.1 * p[k][index]
            torch.testing.assert_close(update[k][index], decay, rtol=1e-9, atol=1e-15)
            assert float(unmasked[t][k][index].sub(decay).abs().max()) > 1e-6
        p = {k: p[k] + update[k] for k in p}
    # Coordinates that had gradients still move.
    assert float(masked[-1]["w"][:, 0].abs().min()) > 0


def test_vector_rule_can_be_a_hand_designed_rule():
    lopt, meta = make(vector_rule="adamw", vector_hparams={"lr": 3e-3, "weight_decay": 0.1})
    rule = lopt.rule(meta)
    params = params_of()
    grads = gradient_sequence(params, steps=4)
    adamw = get_rule("adamw", lr=3e-3, weight_decay=0.1)
    vectors = {k: params[k] for k in ("b", "s")}
    expected = run(adamw, vectors, [{k: g[k] for k in vectors} for g in grads])
    got = run(rule, params, grads)
    for e, o in zip(expected, got):
        for k in vectors:
            torch.testing.assert_close(o[k], e[k])
    assert {"m", "v", "vector_rule/exp_avg"} <= set(rule.parameter_slots())


def test_vmap_over_a_population_equals_a_python_loop():
    lopt, meta = make(step_timescales=(10.0, 1000.0))
    rule = lopt.rule(meta)
    population = [params_of(seed=s) for s in range(4)]
    grads = [gradient_sequence(p, steps=1, seed=10 + i)[0] for i, p in enumerate(population)]
    assert_vmapped_update_equals_loop(
        rule.update, rule.update, rule, population, grads, rtol=1e-10, atol=1e-14
    )


def unrolled_loss(lopt, meta, params, steps=4):
    """A diagonal quadratic's losses summed along a short unroll of the learned rule."""
    rule = lopt.rule(meta)
    curvature = {k: torch.linspace(0.5, 2.0, p.numel(), dtype=p.dtype) for k, p in params.items()}
    state, total = rule.init(params), 0.0
    for t in range(steps):
        grads = {k: curvature[k].reshape(p.shape) * p for k, p in params.items()}
        total = total + sum(0.5 * (grads[k] * p).sum() for k, p in params.items())
        updates, state = rule.update(grads, state, params, step=t)
        params = {k: params[k] + updates[k] for k in params}
    return total


def test_meta_gradients_match_central_differences():
    lopt, meta = make(lr_init=0.05, output_init_scale=1.0)
    meta = {k: v.requires_grad_() for k, v in meta.items()}
    params = params_of()
    grads = torch.autograd.grad(unrolled_loss(lopt, meta, params), list(meta.values()))
    analytic = dict(zip(meta, grads))
    h, checked = 1e-6, 0
    for name in meta:
        for index in {0, meta[name].numel() - 1}:

            def shifted(delta, name=name, index=index):
                moved = {k: v.detach().clone() for k, v in meta.items()}
                moved[name].view(-1)[index] += delta
                return float(unrolled_loss(lopt, moved, params))

            numeric = (shifted(h) - shifted(-h)) / (2 * h)
            value = float(analytic[name].reshape(-1)[index])
            assert math.isclose(value, numeric, rel_tol=1e-4, abs_tol=1e-8), (name, value, numeric)
            checked += 1
    assert checked >= 10
    assert abs(float(analytic["log_lr_matrix"])) > 0 and abs(float(analytic["log_lr_vector"])) > 0


def test_checkpoint_round_trip_gives_the_same_updates(tmp_path):
    lopt = get_lopt("ortho_mlp", vector_rule="adamw", vector_hparams={"lr": 1e-3})
    meta = lopt.init_meta(torch.Generator().manual_seed(3))
    save_checkpoint(tmp_path / "ortho", lopt, meta)
    loaded, loaded_meta, card = load_checkpoint(tmp_path / "ortho")
    assert card["lopt"]["name"] == "ortho_mlp" and loaded.config() == lopt.config()
    params = params_of(torch.float32)
    grads = gradient_sequence(params, steps=3)
    for a, b in zip(
        run(lopt.rule(meta), params, grads), run(loaded.rule(loaded_meta), params, grads)
    ):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_drop_in_optimizer_trains_a_module(tmp_path):
    lopt = get_lopt("ortho_mlp")
    save_checkpoint(tmp_path / "ortho", lopt, lopt.init_meta(torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    opt = LearnedOptimizer(model.parameters(), checkpoint=tmp_path / "ortho", lr=3.0)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]  # untrained, it starts out as an orthogonalised Adam


def _one_step(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The update ``opt`` makes from the gradient of ``model``'s loss on ``(x, y)``."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_ns_dtype_runs_the_shipped_checkpoints_newton_schulz_in_bfloat16_as_the_same_optimizer():
    """bfloat16 Newton–Schulz changes the matrix steps by bfloat16 rounding only (Muon's own
    setting), leaves the vector steps alone, and keeps the checkpoint's identity, so optimizer
    state moves freely between the two settings."""
    x, y = torch.randn(64, 20, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 3
    updates, opts = {}, {}
    for ns_dtype in (None, "bfloat16"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 3))
        opts[ns_dtype] = LearnedOptimizer(model.parameters(), ns_dtype=ns_dtype)
        updates[ns_dtype] = _one_step(opts[ns_dtype], model, x, y)
    shipped, bf16 = opts[None], opts["bfloat16"]
    assert shipped.learned.lopt.ns_dtype == "float32"
    assert bf16.learned.lopt.ns_dtype == "bfloat16"
    assert bf16.learned.id == shipped.learned.id
    for exact, rounded in zip(updates[None], updates["bfloat16"]):
        if exact.ndim == 1:  # vectors: no Newton–Schulz, the same step
            torch.testing.assert_close(rounded, exact, rtol=0, atol=0)
        else:  # bfloat16 keeps 8 significant bits: 1-2% apart over 5 iterations here
            assert not torch.equal(rounded, exact)
            assert float((rounded - exact).norm() / exact.norm()) < 0.05
    bf16.load_state_dict(shipped.state_dict())  # same identity: accepted
    shipped.load_state_dict(bf16.state_dict())


def test_ns_dtype_is_refused_for_a_checkpoint_without_newton_schulz_and_for_a_bad_dtype():
    params = [nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match=r"checkpoint mlp-\w+ \(mlp\).*no Newton–Schulz iteration"):
        LearnedOptimizer(params, checkpoint="mlp_2x32", ns_dtype="bfloat16")
    with pytest.raises(ValueError, match="ns_dtype must be one of"):
        LearnedOptimizer(params, ns_dtype="float16")


def test_l2o_eval_runs_a_checkpoint_with_another_ns_dtype_under_its_own_label_and_cells():
    from l2o.eval.contenders import ContenderError, learned_contenders, rule_contender

    fallback = rule_contender("adam")
    (plain, guarded) = learned_contenders(
        "ortho_mlp", guarded=True, unguarded=True, fallback=fallback
    )
    (bf16, bf16_guarded) = learned_contenders(
        "ortho_mlp", guarded=True, unguarded=True, fallback=fallback, ns_dtype="bfloat16"
    )
    assert bf16.name == "ortho_mlp+bfloat16 NS" and bf16_guarded.name.startswith(bf16.name)
    assert bf16.spec() == {**plain.spec(), "ns_dtype": "bfloat16"}  # cells of its own
    assert bf16_guarded.spec() != guarded.spec()
    assert bf16.build().lopt.ns_dtype == "bfloat16" and plain.build().lopt.ns_dtype == "float32"
    (same,) = learned_contenders(  # the card's own dtype: the plain contender
        "ortho_mlp", guarded=False, unguarded=True, fallback=fallback, ns_dtype="float32"
    )
    assert same.name == plain.name and same.spec() == plain.spec()
    with pytest.raises(ContenderError, match="no Newton–Schulz iteration"):
        learned_contenders(
            "mlp_2x32", guarded=False, unguarded=True, fallback=fallback, ns_dtype="bfloat16"
        )


def test_the_guarded_optimizer_takes_ns_dtype_for_its_learned_candidate():
    from l2o import GuardedLearnedOptimizer

    opt = GuardedLearnedOptimizer([nn.Parameter(torch.zeros(3, 2))], ns_dtype="bfloat16")
    assert opt.learned.lopt.ns_dtype == "bfloat16"
    assert opt.rule.learned.lopt.ns_dtype == "bfloat16"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"hidden_sizes": [0]}, "hidden_sizes"),
        ({"momentum_decays": [1.0]}, "momentum_decays"),
        ({"base_momentum": 3}, "base_momentum"),
        ({"matrix_scaling": "mup"}, "matrix_scaling"),
        ({"ns_dtype": "float16"}, "ns_dtype"),
        ({"vector_rule": "lbfgs"}, "first-order"),
        ({"vector_rule": "nope"}, "nope"),
        ({"vector_hparams": {"lr": 1.0}}, "vector_hparams"),
        ({"lr_init": 0.0}, "lr_init"),
        ({"step_scale": "adaptive"}, "step_scale"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"step_scale_momentum": 3}, "step_scale_momentum"),
        ({"parameter_feature": "no"}, "parameter_feature"),
        ({"mask_unseen": 1}, "mask_unseen"),
    ],
)
def test_bad_configurations_are_refused_with_the_key(config, match):
    with pytest.raises((ValueError, KeyError), match=match):
        OrthoMLPLOpt(**config)
