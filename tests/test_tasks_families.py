"""Task augmentation, task families, suites and the task/suite configs."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.func import grad, vmap

from l2o.tasks import Task, TaskFamily
from l2o.tasks.augment import LossScaleTask, ReparamTask
from l2o.tasks.families import (
    CharLMFamily,
    ConvNetFamily,
    MixtureFamily,
    MLPFamily,
    QuadraticFamily,
    family_names,
    get_family,
)
from l2o.tasks.language import CharLSTMTask, CharTransformerTask
from l2o.tasks.suites import HELD_OUT_SEED, Suite, get_suite, suite_names
from l2o.tasks.supervised import ACTIVATIONS, MLPClassifierTask
from l2o.tasks.synthetic import QuadraticTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def small_lstm():
    return CharLSTMTask(embed_dim=4, hidden_size=6, seq_len=6, batch_size=2)


def small_mlp():
    return MLPClassifierTask(width=8, depth=1, batch_size=16)


AUGMENTED = {
    "reparam_lstm": lambda: ReparamTask(small_lstm(), scale_range=(0.1, 10.0)),
    "reparam_mlp": lambda: ReparamTask(small_mlp(), scale_range=(1e-2, 1e2)),
    "loss_scale_quadratic": lambda: LossScaleTask(QuadraticTask(dim=5), scale_range=(1e-2, 1e2)),
    "loss_scale_lstm_fixed": lambda: LossScaleTask(small_lstm(), scale=3.0),
    "both_mlp": lambda: LossScaleTask(ReparamTask(small_mlp()), scale_range=(0.1, 10.0)),
}


# --------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("make", AUGMENTED.values(), ids=AUGMENTED.keys())
def test_augmented_task_is_deterministic_per_seed(make):
    task = make()
    a, b = task.init_from_seed(5), task.init_from_seed(5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(u, v) for u, v in zip(task.batch(5, 1), task.batch(5, 1)))
    c = task.init_from_seed(6)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("make", AUGMENTED.values(), ids=AUGMENTED.keys())
def test_augmented_population_matches_python_loop(make):
    task = make()
    seeds = [0, 1, 2]
    params, batch = task.population_init(seeds), task.population_batch(seeds, step=2)
    losses = vmap(task.loss)(params, batch)
    grads = vmap(grad(task.loss))(params, batch)
    for i, seed in enumerate(seeds):
        p, b = task.init_from_seed(seed), task.batch(seed, 2)
        torch.testing.assert_close(losses[i], task.loss(p, b))
        g = grad(task.loss)(p, b)
        for k in g:
            torch.testing.assert_close(grads[k][i], g[k], rtol=1e-5, atol=1e-6)


def test_reparam_scales_differ_per_instance_and_per_tensor():
    task = ReparamTask(small_mlp(), scale_range=(1e-3, 1e3))
    c0, c1 = task.scales(0), task.scales(1)
    assert c0.shape == (len(task.init_from_seed(0)),)
    assert not torch.equal(c0, c1) and len(set(c0.tolist())) == len(c0)
    assert bool((c0 >= 1e-3).all() and (c0 <= 1e3).all())


def test_reparam_starts_where_the_base_task_does_and_scales_gradients():
    base = small_mlp()
    task = ReparamTask(base, scale_range=(1e-2, 1e2))
    params, batch = task.init_from_seed(3), task.batch(3, 0)
    base_params, base_batch = base.init_from_seed(3), base.batch(3, 0)
    c = batch[-1]
    effective = task.effective_params(params, c)
    for k in base_params:
        torch.testing.assert_close(effective[k], base_params[k])
    torch.testing.assert_close(task.loss(params, batch), base.loss(base_params, base_batch))
    # d f(c θ)/dθ = c ∇f(c θ)
    g, g_base = grad(task.loss)(params, batch), grad(base.loss)(base_params, base_batch)
    index = {k: i for i, k in enumerate(sorted(params))}
    for k in g:
        torch.testing.assert_close(g[k], c[index[k]] * g_base[k], rtol=1e-5, atol=1e-7)


def test_loss_scale_multiplies_loss_and_gradients():
    base = QuadraticTask(dim=4)
    task = LossScaleTask(base, scale=250.0)
    params, batch = task.init_from_seed(0), task.batch(0, 0)
    base_batch = base.batch(0, 0)
    torch.testing.assert_close(task.loss(params, batch), 250.0 * base.loss(params, base_batch))
    g, g_base = grad(task.loss)(params, batch), grad(base.loss)(params, base_batch)
    torch.testing.assert_close(g["x"], 250.0 * g_base["x"])
    random = LossScaleTask(base, scale_range=(1e-3, 1e3))
    assert float(random.scales(0)) != float(random.scales(1))


@pytest.mark.parametrize("make", AUGMENTED.values(), ids=AUGMENTED.keys())
def test_augmented_gradient_matches_finite_differences_in_float64(make):
    task = make()
    task.dtype = torch.float64
    params, batch = task.init_from_seed(1), task.batch(1, 0)
    analytic = grad(task.loss)(params, batch)
    generator = torch.Generator().manual_seed(1)
    for name in sorted(params):
        i = int(torch.randint(params[name].numel(), (1,), generator=generator))
        eps = 1e-6 * max(1.0, abs(float(params[name].view(-1)[i])))
        values = []
        for sign in (1, -1):
            p = {k: v.clone() for k, v in params.items()}
            p[name].view(-1)[i] += sign * eps
            values.append(task.loss(p, batch))
        numeric = (values[0] - values[1]) / (2 * eps)
        scale = max(1.0, float(analytic[name].abs().max()))
        torch.testing.assert_close(
            analytic[name].view(-1)[i], numeric, rtol=1e-4, atol=1e-7 * scale
        )


def test_wrappers_forward_device_dtype_and_config():
    base = small_mlp()
    task = LossScaleTask(ReparamTask(base, scale_range=(0.5, 2.0)), scale=2.0)
    assert task.name == "mlp+reparam+loss_scale"
    task.dtype = torch.float64
    assert base.dtype == torch.float64 and task.device == base.device
    assert task.config() == {
        "name": "loss_scale",
        "base": {"name": "reparam", "base": base.config(), "scale_range": [0.5, 2.0]},
        "scale": 2.0,
    }


def test_wrappers_reject_bad_scales():
    with pytest.raises(ValueError, match="scale_range"):
        ReparamTask(small_mlp(), scale_range=(10.0, 1.0))
    with pytest.raises(ValueError, match="scale_range"):
        ReparamTask(small_mlp(), scale_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="exactly one"):
        LossScaleTask(small_mlp())
    with pytest.raises(ValueError, match="scale"):
        LossScaleTask(small_mlp(), scale=-1.0)
    with pytest.raises(TypeError, match="Task"):
        ReparamTask("mlp")


# ------------------------------------------------------------------------------------- families


FAMILIES = {
    "mlp": lambda: MLPFamily(datasets=["digits", "mnist1d"], horizon=(10, 50)),
    "cnn": lambda: ConvNetFamily(width=(2, 4)),
    "quadratic": lambda: QuadraticFamily(dim=(2, 8)),
    "char_lm": lambda: CharLMFamily(width=(4, 12), seq_len=(4, 8)),
    "mixture": lambda: MixtureFamily([MLPFamily(), QuadraticFamily()]),
}


@pytest.mark.parametrize("make", FAMILIES.values(), ids=FAMILIES.keys())
def test_family_samples_are_deterministic_and_varied(make):
    family = make()
    first = family.sample(7)
    assert isinstance(first, Task)
    assert first.config() == family.sample(7).config()
    p, q = first.init_from_seed(0), family.sample(7).init_from_seed(0)
    assert all(torch.equal(p[k], q[k]) for k in p)
    configs = {str(family.sample(s).config()) for s in range(8)}
    assert len(configs) > 1


def test_family_draws_stay_in_range_and_carry_the_horizon():
    family = MLPFamily(
        datasets=["mnist1d"], width=(5, 9), depth=(2, 3), activations=["gelu"], horizon=(20, 40)
    )
    for seed in range(10):
        task = family.sample(seed)
        assert 5 <= task.width <= 9 and 2 <= task.depth <= 3
        assert task.activation == "gelu" and task.dataset == "mnist1d"
        assert 32 <= task.batch_size <= 128 and 0.5 <= task.init_scale <= 2.0
        assert isinstance(task.horizon, int) and 20 <= task.horizon <= 40
    assert not hasattr(MLPFamily().sample(0), "horizon")


def test_char_lm_family_draws_both_models_within_range():
    family = CharLMFamily(width=(5, 9), depth=(1, 2), seq_len=(4, 6), batch_size=(2, 3))
    tasks = [family.sample(seed) for seed in range(12)]
    assert {type(t) for t in tasks} == {CharLSTMTask, CharTransformerTask}
    for task in tasks:
        assert 4 <= task.seq_len <= 6 and 2 <= task.batch_size <= 3
        if isinstance(task, CharLSTMTask):
            assert 5 <= task.hidden_size <= 9 and task.embed_dim == task.hidden_size // 2
        else:  # two heads: d_model rounded down to an even width
            assert task.d_model in (4, 6, 8) and task.n_heads == 2 and 1 <= task.n_layers <= 2
    only = CharLMFamily(models=["transformer"], width=8)
    assert all(isinstance(only.sample(s), CharTransformerTask) for s in range(4))
    with pytest.raises(ValueError, match="CharLMFamily: models "):
        CharLMFamily(models=["gru"])
    with pytest.raises(ValueError, match="CharLMFamily: width "):
        CharLMFamily(width=(1, 4))


def test_augmentation_probabilities_wrap_sampled_tasks():
    always = MLPFamily(reparam_prob=1.0, loss_scale_prob=1.0, horizon=(5, 5)).sample(0)
    assert isinstance(always, LossScaleTask) and isinstance(always.base, ReparamTask)
    assert always.horizon == 5
    never = MLPFamily().sample(0)
    assert isinstance(never, MLPClassifierTask)
    # adding augmentation does not change which base task a seed gives
    assert always.base.base.config() == never.config()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"width": (64, 16)}, "width"),
        ({"width": 0}, "width"),
        ({"width": (8.5, 16)}, "width"),
        ({"depth": (-1, 2)}, "depth"),
        ({"batch_size": (0, 8)}, "batch_size"),
        ({"init_scale": (0.0, 1.0)}, "init_scale"),
        ({"horizon": (100, 10)}, "horizon"),
        ({"activations": ["swish"]}, "activations"),
        ({"activations": []}, "activations"),
        ({"datasets": ["cifar10"]}, "datasets"),
        ({"reparam_prob": 1.5}, "reparam_prob"),
        ({"loss_scale_range": (1.0, 0.1)}, "loss_scale_range"),
    ],
)
def test_bad_family_ranges_raise_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"MLPFamily: {argument} "):
        MLPFamily(**kwargs)


def test_other_families_validate_their_fields():
    with pytest.raises(ValueError, match="cond"):
        QuadraticFamily(cond=(0.5, 10.0))
    with pytest.raises(ValueError, match="dim"):
        QuadraticFamily(dim=(10, 2))
    with pytest.raises(ValueError, match="depth"):
        ConvNetFamily(depth=(0, 1))
    with pytest.raises(ValueError, match="families"):
        MixtureFamily([])
    with pytest.raises(ValueError, match="weights"):
        MixtureFamily([MLPFamily()], weights=[1.0, 2.0])


def test_mixture_draws_members_by_weight():
    family = MixtureFamily([MLPFamily(), QuadraticFamily()], weights=[0.0, 1.0])
    assert all(isinstance(family.sample(s), QuadraticTask) for s in range(10))
    both = MixtureFamily([MLPFamily(), QuadraticFamily()])
    kinds = {type(both.sample(s)) for s in range(20)}
    assert kinds == {MLPClassifierTask, QuadraticTask}


def test_get_family_builds_from_config_and_rejects_unknown_names():
    assert set(family_names()) == {"mlp", "cnn", "char_lm", "quadratic", "mixture"}
    for make in FAMILIES.values():
        family = make()
        assert get_family(**family.config()) == family
    with pytest.raises(
        ValueError,
        match=r"unknown task family 'mlpp' \(did you mean 'mlp'\?\); known task families",
    ):
        get_family("mlpp")
    with pytest.raises(ValueError, match="no field 'widht'"):
        get_family("mlp", widht=(1, 2))


def test_replace_gives_a_validated_shifted_family():
    family = MLPFamily()
    assert family.replace(width=(64, 256)).width == (64, 256)
    with pytest.raises(ValueError, match="width"):
        family.replace(width=(256, 64))


# --------------------------------------------------------------------------------------- suites


def test_every_suite_builds_with_held_out_seeds():
    for name in suite_names():
        suite = get_suite(name, n_tasks=1, n_seeds=2)
        assert isinstance(suite, Suite) and suite.name == name and len(suite) >= 1
        for entry in suite:
            assert isinstance(entry.task, Task) and entry.horizon >= 1
            assert entry.seeds == (HELD_OUT_SEED, HELD_OUT_SEED + 1)
            loss = entry.task.loss(
                entry.task.init_from_seed(entry.seeds[0]), entry.task.batch(0, 0)
            )
            assert torch.isfinite(loss)


def test_out_of_distribution_suites_shift_one_axis():
    family = MLPFamily(horizon=(30, 30))
    base = get_suite("in_distribution", family, n_tasks=3)
    assert [e.horizon for e in base] == [30, 30, 30]
    assert [e.horizon for e in get_suite("horizon_x10", family, n_tasks=3)] == [300] * 3
    assert [e.horizon for e in get_suite("horizon_x100", family, n_tasks=3)] == [3000] * 3
    for entry, wide in zip(base, get_suite("width_x4", family, n_tasks=3)):
        assert 3 * entry.task.width <= wide.task.width <= 5 * entry.task.width + 4
        assert wide.task.activation == entry.task.activation
    for entry in get_suite("depth_x3", family, n_tasks=3):
        assert 3 <= entry.task.depth <= 6
    for entry in get_suite("activation_change", family, n_tasks=3):
        assert entry.task.activation in set(ACTIVATIONS) - {"relu", "tanh"}
    for entry in get_suite("dataset_change", family, n_tasks=3):
        assert entry.task.dataset == "mnist1d"
    names = [e.task.name for e in get_suite("architecture_change", family)]
    assert names == ["cnn", "char_lstm", "char_transformer"]
    scaled = get_suite("loss_scale_change", family, n_tasks=2, loss_scales=(1e-3, 1e3))
    assert [float(e.task.scales(0)) for e in scaled] == pytest.approx([1e-3, 1e-3, 1e3, 1e3])


def test_suite_seeds_are_disjoint_from_meta_training_seeds():
    assert HELD_OUT_SEED >= 2**31 - 1  # meta-training draws seeds in [0, 2**31 - 1)


def test_suites_reject_unknown_names_and_unusable_families():
    with pytest.raises(ValueError, match=r"unknown suite 'width_x5'.*; known suites: .*width_x4"):
        get_suite("width_x5")
    with pytest.raises(ValueError, match=r"'width'.*QuadraticFamily"):
        get_suite("width_x4", QuadraticFamily())
    with pytest.raises(ValueError, match="every dataset"):
        get_suite("dataset_change", MLPFamily(datasets=["digits", "mnist1d"]))
    with pytest.raises(ValueError, match="n_tasks"):
        get_suite("in_distribution", n_tasks=0)


def test_suite_accepts_a_family_config_dict():
    suite = get_suite("in_distribution", {"name": "quadratic", "dim": (3, 3)}, n_tasks=2)
    assert [e.task.dim for e in suite] == [3, 3]


# -------------------------------------------------------------------------------------- configs


def _config_names(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_registered_task_and_family_has_a_config_and_every_suite_runs_in_l2o_eval():
    from l2o.cli.eval import _suite_names, compose_eval_config
    from l2o.tasks import task_names

    tasks = set(_config_names("task"))
    assert set(task_names()) <= tasks
    assert {f"{f}_family" for f in family_names()} <= tasks
    every = compose_eval_config(f"suite=[{','.join(suite_names())}]")
    assert set(_suite_names(every)) == set(suite_names())
    assert set(_suite_names(compose_eval_config("suite=all"))) == set(suite_names())


@pytest.mark.parametrize("name", _config_names("task"))
def test_task_config_composes_and_instantiates(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[f"+task={name}"])
    obj = instantiate(cfg.task)
    assert isinstance(obj, (Task, TaskFamily))
    task = obj.sample(0) if isinstance(obj, TaskFamily) else obj
    assert torch.isfinite(task.loss(task.init_from_seed(0), task.batch(0, 0)))
