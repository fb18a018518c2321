"""Learned-optimizer architectures (MLP, LSTM), their features, registry and configs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.func import vmap

from l2o.learned import LOpt, LSTMLOpt, MLPLOpt, get_lopt, lopt_names, register_lopt
from l2o.learned.features import (
    factored_dims,
    factored_second_moment,
    log_sign_preprocess,
    second_moment_normalize,
    tanh_step_embedding,
)
from l2o.learned.registry import _REGISTRY

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Architectures under test: every registered default plus the learnable-decay MLP variant.
LOPTS = {
    "mlp": lambda: MLPLOpt(),
    "mlp_learned_decays": lambda: MLPLOpt(learn_decays=True),
    "lstm": lambda: LSTMLOpt(),
}


def make(kind: str, dtype=torch.float32, seed: int = 0):
    lopt = LOPTS[kind]()
    meta = lopt.init_meta(torch.Generator().manual_seed(seed))
    return lopt, {k: v.to(dtype) for k, v in meta.items()}


def task_params(dtype=torch.float32, seed: int = 1):
    """A matrix, a conv-shaped tensor, a vector and a scalar: factored and unfactored paths."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 4), "conv": (3, 2, 3, 3), "b": (4,), "s": ()}
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


def random_like(params, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def shapes_and_dtypes(tree):
    if isinstance(tree, dict):
        return {k: shapes_and_dtypes(v) for k, v in tree.items()}
    return (tuple(tree.shape), tree.dtype)


# --- update-rule contract ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", LOPTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_update_and_state_shapes_and_dtypes_are_stable_over_steps(kind, dtype):
    lopt, meta = make(kind)
    rule = lopt.rule(meta)
    params = task_params(dtype)
    state = rule.init(params)
    first = shapes_and_dtypes(state)
    for t in range(4):
        grads = random_like(params, seed=10 + t)
        updates, state = rule.update(grads, state, params, step=t)
        assert shapes_and_dtypes(updates) == shapes_and_dtypes(params)
        assert shapes_and_dtypes(state) == first
        assert all(torch.isfinite(u).all() for u in updates.values())
        params = {k: params[k] + updates[k] for k in params}


@pytest.mark.parametrize("kind", LOPTS)
def test_update_does_not_mutate_its_inputs(kind):
    lopt, meta = make(kind)
    rule = lopt.rule(meta)
    params = task_params()
    state = rule.update(random_like(params, 3), rule.init(params), params, step=0)[1]
    grads = random_like(params, 4)
    copies = [{k: v.clone() for k, v in t.items()} for t in (params, grads)]
    state_copy = {s: {k: v.clone() for k, v in d.items()} for s, d in state.items()}
    rule.update(grads, state, params, step=1)
    for original, copy in zip((params, grads), copies):
        assert all(torch.equal(original[k], copy[k]) for k in copy)
    for s, d in state_copy.items():
        assert all(torch.equal(state[s][k], d[k]) for k in d)


@pytest.mark.parametrize("kind", LOPTS)
def test_vmap_over_population_of_8_equals_python_loop_with_per_task_steps(kind):
    lopt, meta = make(kind, torch.float64)
    rule = lopt.rule(meta)
    n = 8
    population = [task_params(torch.float64, seed=s) for s in range(n)]
    stacked = {k: torch.stack([p[k] for p in population]) for k in population[0]}
    steps = torch.tensor([0, 1, 2, 5, 17, 100, 999, 31_000])

    def one(grads, state, params, step):
        return rule.update(grads, state, params, step=step)

    batched_state = vmap(rule.init)(stacked)
    loop_states = [rule.init(p) for p in population]
    for t in range(3):
        grads = [random_like(p, seed=100 * t + i) for i, p in enumerate(population)]
        stacked_grads = {k: torch.stack([g[k] for g in grads]) for k in grads[0]}
        batched_updates, batched_state = vmap(one)(stacked_grads, batched_state, stacked, steps + t)
        for i in range(n):
            updates, loop_states[i] = rule.update(
                grads[i], loop_states[i], population[i], step=int(steps[i]) + t
            )
            for k in updates:
                torch.testing.assert_close(batched_updates[k][i], updates[k], rtol=1e-10, atol=0)
            for slot, values in loop_states[i].items():
                for k, v in values.items():
                    torch.testing.assert_close(batched_state[slot][k][i], v, rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", LOPTS)
def test_first_steps_are_small_at_init(kind):
    lopt, meta = make(kind)
    rule = lopt.rule(meta)
    params = task_params()
    state = rule.init(params)
    for t in range(3):
        # Large gradients: the step size must come from the optimizer, not from the gradient.
        grads = {k: 100 * v for k, v in random_like(params, seed=t).items()}
        updates, state = rule.update(grads, state, params, step=t)
        assert max(float(u.abs().max()) for u in updates.values()) < 1e-2


@pytest.mark.parametrize("kind", LOPTS)
def test_lr_scales_the_update_linearly(kind):
    lopt, meta = make(kind, torch.float64)
    params = task_params(torch.float64)
    grads = random_like(params, 5)
    base = lopt.rule(meta)
    u1, _ = base.update(grads, base.init(params), params, step=3)
    u3, _ = base.replace(lr=3.0).update(grads, base.init(params), params, step=3)
    for k in u1:
        torch.testing.assert_close(u3[k], 3.0 * u1[k])
    scheduled = lopt.rule(meta, lr=lambda step: 0.5 * (step + 1))
    u_s, _ = scheduled.update(grads, base.init(params), params, step=3)
    for k in u1:
        torch.testing.assert_close(u_s[k], 2.0 * u1[k])


def test_rule_hyperparameters_are_only_lr():
    lopt, meta = make("mlp")
    assert lopt.rule(meta).hyperparameter_names() == ("lr",)
    assert LSTMLOpt().rule(LSTMLOpt().init_meta(torch.Generator())).hyperparameter_names() == (
        "lr",
    )
    with pytest.raises(ValueError, match="lr"):
        lopt.rule(meta, lr=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", LOPTS)
def test_rule_on_cuda_matches_cpu_with_device_step_tensors(kind):
    lopt, meta = make(kind, torch.float64)
    params = task_params(torch.float64)
    on_gpu = {k: v.cuda() for k, v in params.items()}
    cpu_rule, gpu_rule = lopt.rule(meta), lopt.rule({k: v.cuda() for k, v in meta.items()})
    cpu_state, gpu_state = cpu_rule.init(params), gpu_rule.init(on_gpu)
    for t in range(3):
        grads = random_like(params, seed=t)
        u_cpu, cpu_state = cpu_rule.update(grads, cpu_state, params, step=t)
        u_gpu, gpu_state = gpu_rule.update(
            {k: v.cuda() for k, v in grads.items()}, gpu_state, on_gpu, step=torch.tensor(t).cuda()
        )
        for k in u_cpu:
            assert u_gpu[k].is_cuda
            torch.testing.assert_close(u_gpu[k].cpu(), u_cpu[k])


# --- meta-gradients ---------------------------------------------------------------------------


# A diagonal quadratic: loss = ½ Σ curvature·(x - target)², gradient in closed form.
def quadratic(params):
    g = torch.Generator().manual_seed(7)
    curvature = {
        k: torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5 for k, v in params.items()
    }
    target = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}

    def loss_and_grads(x):
        diff = {k: x[k] - target[k] for k in x}
        loss = sum(0.5 * (curvature[k] * diff[k] ** 2).sum() for k in x)
        return loss, {k: curvature[k] * diff[k] for k in x}

    return loss_and_grads


def unrolled_meta_loss(lopt: LOpt, meta, params, lr: float, steps: int = 5):
    """Sum of the training losses along a ``steps``-step unroll of the learned rule."""
    rule = lopt.rule(meta, lr=lr)
    loss_and_grads = quadratic(params)
    state = rule.init(params)
    total = 0.0
    for t in range(steps):
        loss, grads = loss_and_grads(params)
        total = total + loss
        updates, state = rule.update(grads, state, params, step=t)
        params = {k: params[k] + updates[k] for k in params}
    return total + loss_and_grads(params)[0]


# Learning rates that make the untrained rules move the quadratic noticeably in 5 steps.
UNROLL_LR = {"mlp": 300.0, "mlp_learned_decays": 300.0, "lstm": 3.0}


@pytest.mark.parametrize("kind", LOPTS)
def test_meta_gradient_of_5_step_unroll_matches_central_differences(kind):
    lopt, meta = make(kind, torch.float64)
    meta = {k: v.requires_grad_() for k, v in meta.items()}
    params = task_params(torch.float64)
    lr = UNROLL_LR[kind]
    meta_loss = unrolled_meta_loss(lopt, meta, params, lr)
    names = list(meta)
    grads = dict(zip(names, torch.autograd.grad(meta_loss, [meta[k] for k in names])))
    assert any(float(g.abs().max()) > 0 for g in grads.values())

    h = 1e-6
    checked = 0
    for name in names:
        for index in {0, meta[name].numel() - 1}:

            def perturbed(delta, name=name, index=index):
                shifted = {k: v.detach().clone() for k, v in meta.items()}
                shifted[name].view(-1)[index] += delta
                return float(unrolled_meta_loss(lopt, shifted, params, lr))

            numeric = (perturbed(h) - perturbed(-h)) / (2 * h)
            analytic = float(grads[name].reshape(-1)[index])
            assert math.isclose(analytic, numeric, rel_tol=1e-4, abs_tol=1e-7), (
                name,
                index,
                analytic,
                numeric,
            )
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("kind", LOPTS)
def test_meta_gradients_are_finite_with_exactly_zero_gradient_coordinates(kind):
    lopt, meta = make(kind)
    meta = {k: v.requires_grad_() for k, v in meta.items()}
    rule = lopt.rule(meta, lr=10.0)
    params = task_params()
    state = rule.init(params)
    total = 0.0
    for t in range(4):
        grads = random_like(params, seed=t)
        grads["w"] = grads["w"] * (torch.arange(grads["w"].numel()).reshape(6, 4) % 2)
        grads["b"] = torch.zeros_like(grads["b"])  # a whole tensor with zero gradient
        grads["s"] = torch.zeros_like(grads["s"])
        updates, state = rule.update(grads, state, params, step=t)
        assert all(torch.isfinite(u).all() for u in updates.values())
        params = {k: params[k] + updates[k] for k in params}
        total = total + sum((p**2).sum() for p in params.values())
    meta_grads = torch.autograd.grad(total, list(meta.values()))
    assert all(torch.isfinite(g).all() for g in meta_grads)
    assert any(g.abs().sum() > 0 for g in meta_grads)


def test_learned_decays_receive_meta_gradients():
    lopt, meta = make("mlp_learned_decays", torch.float64)
    meta = {k: v.requires_grad_() for k, v in meta.items()}
    meta_loss = unrolled_meta_loss(lopt, meta, task_params(torch.float64), lr=300.0)
    (g,) = torch.autograd.grad(meta_loss, [meta["momentum_decay_logits"]])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# --- under the torch.optim adapter ------------------------------------------------------------


@pytest.mark.parametrize("kind", LOPTS)
def test_rule_trains_under_the_torch_optim_adapter_like_the_functional_loop(kind, tmp_path):
    from l2o.optim.adapter import RuleOptimizer

    lopt, meta = make(kind)
    params = task_params()
    loss_and_grads = quadratic(params)
    rule = lopt.rule(meta, lr=UNROLL_LR[kind])

    # Reference: the functional rule, 6 steps.
    x, state = dict(params), rule.init(params)
    for t in range(6):
        _, grads = loss_and_grads(x)
        updates, state = rule.update(grads, state, x, step=t)
        x = {k: x[k] + updates[k] for k in x}

    def train(tensors, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss, _ = loss_and_grads(tensors)
            loss.backward()
            opt.step()

    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = RuleOptimizer(list(tensors.values()), lopt.rule(meta), lr=UNROLL_LR[kind])
    train(tensors, opt, 3)
    # The learned rule's state survives a weights-only state_dict round trip mid-run.
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    resumed = {k: torch.nn.Parameter(v.detach().clone()) for k, v in tensors.items()}
    opt2 = RuleOptimizer(list(resumed.values()), lopt.rule(meta))
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    train(resumed, opt2, 3)
    for k in x:
        torch.testing.assert_close(resumed[k].detach(), x[k], rtol=1e-5, atol=1e-6)


# --- features ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["reference_update", "fused_update"])
def test_mlp_equals_an_explicit_mlp_on_normalised_features_and_broadcast_step_embedding(path):
    # Reference: the textbook evaluation (normalise features, append the step embedding to
    # every coordinate, run the MLP) against the rule's folded first layer, on both paths.
    lopt, meta = make("mlp", torch.float64)
    rule = dataclasses.replace(lopt.rule(meta), chunk_size=5)
    params = task_params(torch.float64)
    state = rule.init(params)
    grads = random_like(params, 9)
    step = 37
    updates, _ = getattr(rule, path)(grads, state, params, step=step)
    for name, p in params.items():
        decays = tuple(torch.tensor(lopt.decays[g], dtype=p.dtype) for g in lopt.decays)
        slots = rule._accumulate(grads[name], state, name, decays)
        x = rule._features(grads[name], p, slots)
        assert x.shape == (p.numel(), lopt.num_features)
        x = x / torch.sqrt((x * x).mean(0, keepdim=True) + 1e-5)
        emb = torch.tensor([math.tanh(step / s - 1) for s in lopt.step_timescales], dtype=x.dtype)
        h = torch.cat([x, emb.expand(len(x), -1)], dim=1)
        for i in range(len(lopt.hidden_sizes) + 1):
            h = h @ meta[f"w{i}"] + meta[f"b{i}"]
            if i < len(lopt.hidden_sizes):
                h = torch.relu(h)
        expected = -h[:, 0] * torch.exp(1e-3 * h[:, 1]) * 1e-3
        torch.testing.assert_close(updates[name], expected.reshape(p.shape))


def test_factored_second_moment_is_exact_for_rank_one_squares():
    a, b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(7, dtype=torch.float64) + 0.1
    g2 = torch.outer(a, b).unsqueeze(-1)  # [5, 7, 1 decay]
    v_hat = factored_second_moment(g2.mean(1), g2.mean(0), (0, 1), eps=0.0)
    torch.testing.assert_close(v_hat, g2)


def test_factored_dims_picks_the_two_largest_dims():
    assert factored_dims((6, 4)) == (0, 1)
    assert factored_dims((64, 32, 3, 3)) == (0, 1)
    assert factored_dims((3, 3, 128)) == (1, 2)
    assert factored_dims((1, 9)) is None
    assert factored_dims((9,)) is None
    assert factored_dims(()) is None


def test_second_moment_normalize_gives_unit_second_moment_and_keeps_zeros():
    x = torch.randn(100, 3, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 1e3])
    y = second_moment_normalize(x, 0, eps=0.0)
    torch.testing.assert_close(y.pow(2).mean(0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(second_moment_normalize(torch.zeros(4, 2)), torch.zeros(4, 2))


def test_tanh_step_embedding_values_and_tensor_steps():
    scales = (1.0, 10.0, 1e3)
    e0 = tanh_step_embedding(0, scales, dtype=torch.float64, device=torch.device("cpu"))
    torch.testing.assert_close(e0, torch.full((3,), math.tanh(-1.0), dtype=torch.float64))
    e = tanh_step_embedding(torch.tensor(20), scales, dtype=torch.float64, device="cpu")
    expected = torch.tensor([math.tanh(20 / s - 1) for s in scales], dtype=torch.float64)
    torch.testing.assert_close(e, expected)


def test_log_sign_preprocess_matches_andrychowicz_and_is_smooth_at_zero():
    p = 10.0
    g = torch.tensor([2.0, -1e-3, 1e-6, 0.0, -1e-7], dtype=torch.float64, requires_grad=True)
    out = log_sign_preprocess(g, p)
    expected = torch.tensor(
        [
            [math.log(2.0) / p, 1.0],
            [math.log(1e-3) / p, -1.0],
            [-1.0, math.exp(p) * 1e-6],
            [-1.0, 0.0],
            [-1.0, -math.exp(p) * 1e-7],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), g)
    assert torch.isfinite(grad).all()


# --- registry and configs ---------------------------------------------------------------------


def test_registry_knows_the_architectures_and_rejects_unknown_names():
    assert {"mlp", "lstm"} <= set(lopt_names())
    assert isinstance(get_lopt("mlp", hidden_sizes=[8]), MLPLOpt)
    assert isinstance(get_lopt("lstm"), LSTMLOpt)
    with pytest.raises(ValueError, match=r"unknown learned optimizer 'nope'.*lstm.*mlp"):
        get_lopt("nope")


def test_register_lopt_adds_a_name_and_guards_clashes():
    class Tiny(MLPLOpt):
        name = "tiny-test-lopt"

    class Impostor(LSTMLOpt):
        name = "tiny-test-lopt"

    try:
        register_lopt("tiny-test-lopt")(Tiny)
        assert isinstance(get_lopt("tiny-test-lopt", hidden_sizes=[4]), Tiny)
        with pytest.raises(ValueError, match="already registered"):
            register_lopt("tiny-test-lopt", Impostor)
        with pytest.raises(ValueError, match="name attribute"):
            register_lopt("other-name", Tiny)
    finally:
        _REGISTRY.unregister("tiny-test-lopt")


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_config_rebuilds_an_equal_lopt(kind):
    lopt = get_lopt(kind)
    again = get_lopt(kind, **lopt.config())
    assert again.config() == lopt.config()
    a = lopt.init_meta(torch.Generator().manual_seed(3))
    b = again.init_meta(torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"momentum_decays": [0.9, 1.0]}, "momentum_decays"),
        ({"rms_decays": []}, "rms_decays"),
        ({"hidden_sizes": [0]}, "hidden_sizes"),
        ({"step_mult": float("nan")}, "step_mult"),
    ],
)
def test_mlp_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPLOpt(**kwargs)


@pytest.mark.parametrize(("name", "cls"), [("mlp", MLPLOpt), ("lstm", LSTMLOpt)])
def test_lopt_configs_compose_and_instantiate_to_the_registered_defaults(name, cls):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=[f"+lopt={name}"])
    lopt = instantiate(cfg.lopt)
    assert type(lopt) is cls
    assert lopt.config() == get_lopt(name).config()
    assert json.loads(json.dumps(lopt.config())) == lopt.config()  # plain JSON for cards
