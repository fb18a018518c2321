"""Core tasks, offline datasets and the task registry (l2o.tasks.{data,synthetic,supervised})."""

from __future__ import annotations

import json
import math
import random
import socket

import numpy as np
import pytest
import torch
from torch.func import grad, vmap

from l2o.tasks import (
    AutoencoderTask,
    ConvNetTask,
    LogisticRegressionTask,
    MLPClassifierTask,
    QuadraticTask,
    RosenbrockTask,
    Task,
    get_task,
    register_task,
    task_names,
)
from l2o.tasks import data as task_data
from l2o.tasks.augment import ReparamTask

# One small instance of every task type (and both datasets for the networks).
SMALL = {
    "quadratic": ("quadratic", dict(dim=6, cond=50.0, noise_std=0.1)),
    "rosenbrock": ("rosenbrock", dict(dim=4)),
    "logreg": ("logreg", dict(dataset="digits", batch_size=32)),
    "mlp_digits": (
        "mlp",
        dict(dataset="digits", width=8, depth=2, activation="tanh", batch_size=32),
    ),
    "mlp_mnist1d": (
        "mlp",
        dict(dataset="mnist1d", width=8, depth=1, activation="gelu", batch_size=32),
    ),
    "cnn_digits": ("cnn", dict(dataset="digits", channels=(4, 6), batch_size=16)),
    "cnn_mnist1d": (
        "cnn",
        dict(dataset="mnist1d", channels=(4,), activation="silu", batch_size=16),
    ),
    "autoencoder": ("autoencoder", dict(width=8, bottleneck=3, batch_size=32)),
}
DATASET_TASKS = [k for k in SMALL if k not in ("quadratic", "rosenbrock")]


def make(key: str) -> Task:
    name, kwargs = SMALL[key]
    return get_task(name, **kwargs)


def all_close(a: dict, b: dict, **tol) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], **tol) for k in a)


def same_batch(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SMALL)
def test_same_seed_gives_same_params_and_batches_and_different_seeds_differ(key):
    task, twin = make(key), make(key)
    assert all_close(task.init_from_seed(3), twin.init_from_seed(3), rtol=0, atol=0)
    assert not all_close(task.init_from_seed(3), task.init_from_seed(4))
    for split in ("train", "eval"):
        assert same_batch(task.batch(3, 7, split), twin.batch(3, 7, split))
    if key == "rosenbrock":  # deterministic function: no data at all
        assert task.batch(3, 7) == ()
        return
    assert not same_batch(task.batch(3, 7), task.batch(4, 7))
    if key != "quadratic" or task.noise_std > 0:
        assert not same_batch(task.batch(3, 7), task.batch(3, 8))


def test_init_does_not_touch_the_global_rng():
    state = torch.get_rng_state()
    for key in SMALL:
        make(key).init_from_seed(0)
    assert torch.equal(state, torch.get_rng_state())


def test_batch_indices_are_distinct_in_range_and_a_function_of_seed_and_step():
    idx = task_data.batch_indices(5, 2, 64, 100)
    assert idx.dtype == torch.int64 and idx.shape == (64,)
    assert len(set(idx.tolist())) == 64 and idx.min() >= 0 and idx.max() < 100
    assert torch.equal(idx, task_data.batch_indices(5, 2, 64, 100))
    assert not torch.equal(idx, task_data.batch_indices(5, 3, 64, 100))
    assert not torch.equal(idx, task_data.batch_indices(6, 2, 64, 100))
    assert not torch.equal(idx, task_data.batch_indices(5, 2, 64, 100, stream=1))
    with pytest.raises(ValueError, match="batch_size"):
        task_data.batch_indices(0, 0, 101, 100)


def _fisher_yates_prefix(draws: list[int], n: int) -> list[int]:
    """The forward Fisher–Yates shuffle of ``range(n)`` replayed swap by swap (Durstenfeld's
    algorithm as torch's CPU ``randperm`` runs it), cut to the first ``len(draws)`` entries."""
    perm = list(range(n))
    for t, draw in enumerate(draws):
        j = t + draw % (n - t)
        perm[t], perm[j] = perm[j], perm[t]
    return perm[: len(draws)]


@pytest.mark.parametrize(
    "n, batch_size, rows",
    [(4000, 64, 40), (4000, 1, 20), (100, 100, 30), (5, 5, 64), (1437, 200, 17), (1, 1, 16)],
)
def test_stacked_batch_indices_equal_randperm_row_by_row(n, batch_size, rows):
    """The vectorised draw (from ``_VECTORISED_FROM_ROWS`` rows on) gives torch.randperm's
    prefixes bit for bit: the reference is torch itself, row by row, and a Python replay of
    the shuffle on the same 32-bit draws."""
    assert rows >= task_data._VECTORISED_FROM_ROWS
    rng = random.Random(n * 1000 + batch_size)
    seeds = [rng.randrange(-(2**62), 2**62) for _ in range(rows)]
    steps = [rng.randrange(0, 10**6) for _ in range(rows)]
    expected = torch.stack(
        [task_data.batch_indices(s, t, batch_size, n, stream=3) for s, t in zip(seeds, steps)]
    )
    got = task_data.stacked_batch_indices(seeds, steps, batch_size, n, stream=3)
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    draws = task_data._mt19937_draws(seeds, steps, batch_size, stream=3)
    replayed = [_fisher_yates_prefix(row, n) for row in draws.tolist()]
    assert torch.equal(got, torch.tensor(replayed))


def test_shuffled_prefixes_follow_chains_of_earlier_swaps():
    """Draws chosen so that swaps hit the prefix and each other, what random draws over a large
    range rarely give, checked against the replay."""
    n = 8
    # [1, 1, ...]: step k swaps k and k + 1, a chain as long as the prefix.
    cases = [[1] * 7 + [0], [2, 1, 1, 0, 0, 0, 0, 0], [7, 6, 5, 4, 3, 2, 1, 0], [3, 3, 3] + [0] * 5]
    cases += [[random.Random(i).randrange(2**32) for _ in range(n)] for i in range(200)]
    got = task_data._shuffled_prefixes(torch.tensor(cases), n)
    assert got.tolist() == [_fisher_yates_prefix(row, n) for row in cases]


def test_shuffled_prefixes_of_a_range_too_long_for_int32_keys():
    """``n * B >= 2**31``: the lookups' keys are int64."""
    n, width = 2**28, 16
    rng = random.Random(1)
    cases = [[rng.randrange(2**32) for _ in range(width)] for _ in range(20)]
    cases.append([n - 1 - t for t in range(width)])  # every swap hits the end of the range
    got = task_data._shuffled_prefixes(torch.tensor(cases), n)
    assert got.tolist() == [_sparse_fisher_yates_prefix(row, n) for row in cases]


def _sparse_fisher_yates_prefix(draws: list[int], n: int) -> list[int]:
    """:func:`_fisher_yates_prefix` for a range too long for a list: the swaps in a dict."""
    moved: dict[int, int] = {}
    for t, draw in enumerate(draws):
        j = t + draw % (n - t)
        moved[t], moved[j] = moved.get(j, j), moved.get(t, t)
    return [moved[t] for t in range(len(draws))]


def test_stacked_batch_indices_below_the_vectorised_size_and_refusals():
    seeds, steps = [3, 4, 5], [0, 0, 7]
    expected = torch.stack([task_data.batch_indices(s, t, 8, 50) for s, t in zip(seeds, steps)])
    assert torch.equal(task_data.stacked_batch_indices(seeds, steps, 8, 50), expected)
    assert task_data.stacked_batch_indices([], [], 8, 50).shape == (0, 8)
    with pytest.raises(ValueError, match="2 seeds but 1 steps"):
        task_data.stacked_batch_indices([1, 2], [0], 8, 50)
    with pytest.raises(ValueError, match="batch_size"):
        task_data.stacked_batch_indices([1], [0], 51, 50)
    for task in (make("mlp_digits"), make("quadratic"), ReparamTask(make("logreg"))):
        with pytest.raises(ValueError, match="num_steps must be a positive integer"):
            task.population_batches([0, 1], [0, 0], 0)


def test_mix_seeds_over_arrays_equals_mix_seed():
    rng = random.Random(0)
    values = [(rng.randrange(-(2**63), 2**64), rng.randrange(0, 2**40)) for _ in range(500)]
    values += [(-1, 0), (0, 0), (2**64 - 1, 1)]
    seeds, steps = zip(*values)
    mixed = task_data._mix_seeds(7, task_data._as_uint64(seeds), task_data._as_uint64(steps))
    assert [int(h) for h in mixed] == [task_data.mix_seed(7, s, t) for s, t in values]


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("key", ["quadratic", "mlp_mnist1d", "cnn_digits", "reparam_logreg"])
def test_population_batches_stack_the_members_batches_step_by_step(key, split):
    """A truncation's batches at once (``[K, P, ...]``) equal the per-step batches, members at
    different steps included; 20 members x 3 steps take the vectorised draw."""
    task = ReparamTask(make("logreg")) if key == "reparam_logreg" else make(key)
    if key == "cnn_digits":
        task.eval_batch_size = 16  # held-out minibatches, not the whole eval set
    seeds = list(range(20))
    first = [2 * s for s in seeds]
    batches = task.population_batches(seeds, first, 3, split)
    for k in range(3):
        expected = [task.batch(s, f + k, split) for s, f in zip(seeds, first)]
        assert same_batch(tuple(t[k] for t in batches), tuple(map(torch.stack, zip(*expected))))


# --- population (vmap) == loop -----------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("key", SMALL)
def test_vmapped_population_loss_and_grad_equal_a_loop_over_instances(key, split):
    task = make(key)
    seeds, step = [0, 5, 11], 4
    params = task.population_init(seeds)
    batch = task.population_batch(seeds, step, split)
    losses = vmap(task.loss)(params, batch)
    grads = vmap(grad(task.loss))(params, batch)
    assert losses.shape == (len(seeds),)
    for i, seed in enumerate(seeds):
        p, b = task.init_from_seed(seed), task.batch(seed, step, split)
        torch.testing.assert_close(losses[i], task.loss(p, b), rtol=1e-5, atol=1e-6)
        g = grad(task.loss)(p, b)
        for name in g:
            torch.testing.assert_close(grads[name][i], g[name], rtol=1e-5, atol=1e-6)


def test_eval_split_is_the_whole_held_out_set_unless_an_eval_batch_size_is_given():
    task = get_task("logreg", batch_size=32)
    x, y = task.batch(0, 0, "eval")
    assert torch.equal(x, task.data.x_eval) and torch.equal(y, task.data.y_eval)
    assert same_batch(task.batch(0, 0, "eval"), task.batch(9, 50, "eval"))
    small = get_task("logreg", batch_size=32, eval_batch_size=16)
    xe, _ = small.batch(0, 0, "eval")
    assert xe.shape == (16, 64)
    assert not same_batch(small.batch(0, 0, "eval"), small.batch(1, 0, "eval"))
    # eval minibatches come from the held-out rows only
    rows = {tuple(r.tolist()) for r in task.data.x_eval}
    assert all(tuple(r.tolist()) in rows for r in xe)


# --- gradients against finite differences (float64) --------------------------------------------


@pytest.mark.parametrize("key", SMALL)
def test_gradients_match_central_differences_in_float64(key):
    task = make(key)
    task.dtype = torch.float64  # an instance-level float64 copy of the task
    params = task.init_from_seed(1)
    batch = task.batch(1, 2)
    assert all(p.dtype == torch.float64 for p in params.values())
    assert all(t.dtype == torch.float64 for t in batch if t.is_floating_point())
    g = grad(task.loss)(params, batch)
    pick = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name, p in params.items():
        for flat in torch.randint(p.numel(), (3,), generator=pick).tolist():
            shifted = []
            for sign in (1.0, -1.0):
                q = dict(params)
                q[name] = p.flatten().clone()
                q[name][flat] += sign * eps
                q[name] = q[name].reshape(p.shape)
                shifted.append(task.loss(q, batch).item())
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            analytic = g[name].flatten()[flat].item()
            assert math.isclose(analytic, numeric, rel_tol=1e-5, abs_tol=1e-7), (name, flat)


# --- trainability --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SMALL)
def test_adam_decreases_the_eval_loss_within_a_few_steps(key):
    task = make(key)
    params = {k: v.clone().requires_grad_(True) for k, v in task.init_from_seed(0).items()}
    opt = torch.optim.Adam(params.values(), lr=0.02)
    with torch.no_grad():
        before = task.eval_loss(params, seed=0).item()
    for step in range(30):
        opt.zero_grad()
        task.loss(params, task.batch(0, step)).backward()
        opt.step()
    with torch.no_grad():
        after = task.eval_loss(params, seed=0).item()
    assert after < 0.95 * before, (before, after)


# --- problem definitions -------------------------------------------------------------------------


def test_quadratic_has_the_requested_spectrum_and_its_minimiser_has_zero_eval_loss():
    task = QuadraticTask(dim=8, cond=1e3)
    a, x_star, noise = task.batch(seed=2, step=0, split="eval")
    eig = torch.linalg.eigvalsh(a.double())
    torch.testing.assert_close(
        eig, torch.logspace(-3, 0, 8, dtype=torch.float64), rtol=1e-5, atol=0
    )
    assert torch.count_nonzero(noise) == 0
    assert task.loss({"x": x_star}, (a, x_star, noise)).abs().item() < 1e-6
    # different instances are different problems
    a2, x_star2, _ = task.batch(seed=3, step=0, split="eval")
    assert not torch.allclose(a, a2) and not torch.allclose(x_star, x_star2)


def test_quadratic_gradient_noise_is_unbiased_with_the_requested_std():
    task = QuadraticTask(dim=4, noise_std=0.5)
    x = {"x": torch.zeros(4)}
    clean = grad(task.loss)(x, task.batch(0, 0, "eval"))["x"]
    steps = [task.batch(0, s) for s in range(2000)]
    noisy = vmap(grad(task.loss), in_dims=(None, 0))(x, tuple(map(torch.stack, zip(*steps))))["x"]
    diff = noisy - clean
    assert diff.mean(0).abs().max() < 0.05
    torch.testing.assert_close(diff.std(0), torch.full((4,), 0.5), rtol=0.08, atol=0)


def test_rosenbrock_is_zero_at_its_minimum_and_starts_at_the_classic_point():
    task = RosenbrockTask(dim=5, init_jitter=0.0)
    assert task.loss({"x": torch.ones(5)}, ()).item() == 0.0
    x0 = task.init_from_seed(0)["x"]
    torch.testing.assert_close(x0, torch.tensor([-1.2, 1.0, -1.2, 1.0, -1.2]))
    two = RosenbrockTask(dim=2, init_jitter=0.0)
    assert two.loss(two.init_from_seed(0), ()).item() == pytest.approx(24.2, rel=1e-6)


def test_network_tasks_have_the_documented_shapes():
    cnn2 = ConvNetTask(dataset="digits", channels=(4, 6), batch_size=8)
    cnn1 = ConvNetTask(dataset="mnist1d", channels=(4, 6), kernel_size=5, batch_size=8)
    assert cnn2.init_from_seed(0)["0.weight"].shape == (4, 1, 3, 3)
    assert cnn1.init_from_seed(0)["0.weight"].shape == (4, 1, 5)
    for task in (cnn2, cnn1):
        assert task.logits(task.init_from_seed(0), task.batch(0, 0)[0]).shape == (8, 10)
    mlp = MLPClassifierTask(width=7, depth=3)
    shapes = {k: tuple(v.shape) for k, v in mlp.init_from_seed(0).items()}
    assert [s for k, s in shapes.items() if k.endswith("weight")] == [
        (7, 64),
        (7, 7),
        (7, 7),
        (10, 7),
    ]
    assert sum(math.prod(s) for s in shapes.values()) == mlp.num_params()
    assert MLPClassifierTask(depth=0).init_from_seed(0).keys() == {"0.weight", "0.bias"}
    logreg = LogisticRegressionTask(dataset="mnist1d")
    assert logreg.init_from_seed(0)["0.weight"].shape == (10, 40)
    ae = AutoencoderTask(width=16, bottleneck=4, batch_size=8)
    (x,) = ae.batch(0, 0)
    assert x.shape == (8, 64) and ae.apply(ae.init_from_seed(0), x).shape == (8, 64)


def test_fan_in_init_scales_with_init_scale_and_zeroes_biases():
    base = MLPClassifierTask(width=256, depth=1, activation="relu")
    p = base.init_from_seed(0)
    assert p["0.weight"].std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    assert p["2.weight"].std().item() == pytest.approx(math.sqrt(1 / 256), rel=0.05)
    assert torch.count_nonzero(p["0.bias"]) == 0
    half = MLPClassifierTask(width=256, depth=1, activation="relu", init_scale=0.5)
    torch.testing.assert_close(half.init_from_seed(0)["0.weight"], 0.5 * p["0.weight"])


def test_accuracy_is_a_fraction():
    task = LogisticRegressionTask()
    acc = task.accuracy(task.init_from_seed(0), task.batch(0, 0, "eval"))
    assert 0.0 <= acc.item() <= 1.0


# --- datasets ------------------------------------------------------------------------------------


def test_datasets_have_fixed_standardised_splits():
    digits = task_data.load_dataset("digits")
    assert (digits.num_train, digits.num_eval, digits.num_features) == (1500, 297, 64)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.mean(0).abs().max() < 1e-5
    assert set(digits.y_train.unique().tolist()) == set(range(10))
    m1d = task_data.load_dataset("mnist1d")
    assert (m1d.num_train, m1d.num_eval, m1d.example_shape) == (4000, 1000, (40,))
    assert m1d.x_train.std().item() == pytest.approx(1.0, abs=0.05)
    assert task_data.load_dataset("digits") is digits  # built once per process


def test_dataset_generation_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access attempted during dataset generation")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    # __wrapped__ bypasses the in-process cache, so both datasets are really rebuilt here
    digits = task_data.digits.__wrapped__()
    assert torch.equal(digits.x_train, task_data.digits().x_train)
    small = task_data.mnist1d.__wrapped__(num_samples=200, length=24)
    assert small.x_train.shape == (160, 24) and small.x_eval.shape == (40, 24)


def test_mnist1d_generation_is_deterministic_and_leaves_global_rngs_alone():
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    a = task_data.mnist1d.__wrapped__(num_samples=100, length=16)
    b = task_data.mnist1d.__wrapped__(num_samples=100, length=16)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_eval, b.y_eval)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


# --- registry, configs and errors ----------------------------------------------------------------


def test_registry_knows_the_core_tasks_and_configs_round_trip():
    assert {"quadratic", "rosenbrock", "logreg", "mlp", "cnn", "autoencoder"} <= set(task_names())
    for key in SMALL:
        task = make(key)
        config = task.config()
        assert json.loads(json.dumps(config)) == config
        rebuilt = get_task(**config)
        assert type(rebuilt) is type(task) and rebuilt.config() == config
        assert all_close(rebuilt.init_from_seed(2), task.init_from_seed(2), rtol=0, atol=0)


def test_unknown_task_name_suggests_the_closest_and_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown task 'mpl'.*'mlp'.*rosenbrock"):
        get_task("mpl")


def test_unknown_argument_names_the_argument_and_suggests_a_fix():
    with pytest.raises(ValueError, match=r"no argument 'widht'.*'width'"):
        get_task("mlp", widht=3)


def test_register_task_refuses_to_rebind_a_name():
    register_task("mlp", MLPClassifierTask)  # same class again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_task("mlp", ConvNetTask)
    with pytest.raises(TypeError):
        register_task("not_a_task", dict)


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [
        ("quadratic", dict(dim=0), "dim"),
        ("quadratic", dict(cond=0.5), "cond"),
        ("quadratic", dict(noise_std=-1.0), "noise_std"),
        ("rosenbrock", dict(dim=1), "dim"),
        ("logreg", dict(dataset="cifar10"), "dataset"),
        ("logreg", dict(batch_size=10**6), "batch_size"),
        ("mlp", dict(width=0), "width"),
        ("mlp", dict(depth=-1), "depth"),
        ("mlp", dict(width=2.5), "width"),
        ("mlp", dict(activation="relux"), "activation"),
        ("mlp", dict(batch_size=0), "batch_size"),
        ("mlp", dict(init_scale=-1.0), "init_scale"),
        ("mlp", dict(eval_batch_size=10**6), "eval_batch_size"),
        ("cnn", dict(channels=()), "channels"),
        ("cnn", dict(channels=(4, 0)), "channels"),
        ("cnn", dict(kernel_size=2), "kernel_size"),
        ("autoencoder", dict(bottleneck=0), "bottleneck"),
    ],
)
def test_impossible_constructor_arguments_raise_value_errors_naming_the_argument(
    name, kwargs, argument
):
    with pytest.raises(ValueError, match=argument):
        get_task(name, **kwargs)


@pytest.mark.parametrize("key", ["quadratic", "rosenbrock", "logreg"])
def test_unknown_split_is_rejected(key):
    with pytest.raises(ValueError, match="split"):
        make(key).batch(0, 0, split="test")


# --- devices -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("key", SMALL)
def test_tasks_moved_to_cuda_give_the_cpu_losses(key):
    cpu = make(key)
    gpu = make(key).to("cuda")
    params, batch = gpu.population_init([0, 1]), gpu.population_batch([0, 1], 3)
    assert all(p.is_cuda for p in params.values()) and all(t.is_cuda for t in batch)
    losses = vmap(gpu.loss)(params, batch).cpu()
    expected = vmap(cpu.loss)(cpu.population_init([0, 1]), cpu.population_batch([0, 1], 3))
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-5)
