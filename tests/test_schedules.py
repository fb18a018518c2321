"""Schedules: closed forms, torch.optim.lr_scheduler twins, tensor steps under vmap, bad input."""

import math
import pickle
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as torch_sched

from l2o.optim import schedules as S

STEPS = range(0, 400)


def torch_lrs(make_scheduler, n_steps, lr=1.0, **sgd_kwargs):
    """The lr a torch scheduler sets for updates 0..n_steps-1 on a dummy SGD optimizer."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr, **sgd_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any misuse of the scheduler API fails the test
        scheduler = make_scheduler(opt)
        lrs = []
        for _ in range(n_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
    return lrs


def assert_close_lists(actual, expected, rtol=1e-12, atol=1e-14):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert isinstance(a, float)
        assert math.isclose(a, e, rel_tol=rtol, abs_tol=atol), (step, a, e)


# ----------------------------------------------------------------------------- closed forms


def _sgdr_closed_form(t, lr, T_0, T_mult, eta_min):
    # Walk the periods with integers (independent of the log formula used by the schedule).
    start, period = 0, T_0
    while t >= start + period:
        start, period = start + period, period * T_mult
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * (t - start) / period)) / 2


def _cyclic_closed_form(t, base, peak, up, down, mode, gamma):
    cycle_len = up + down
    cycle = t // cycle_len  # 0-based
    pos = t - cycle * cycle_len
    frac = pos / up if pos <= up else 1 - (pos - up) / down
    scale = {"triangular": 1.0, "triangular2": 0.5**cycle, "exp_range": gamma**t}[mode]
    return base + (peak - base) * frac * scale


CLOSED_FORMS = {
    "constant": (S.Constant(0.3), lambda t: 0.3),
    "step_decay": (S.StepDecay(0.5, step_size=7, gamma=0.3), lambda t: 0.5 * 0.3 ** (t // 7)),
    "multistep": (
        S.MultiStep(0.5, milestones=[10, 50, 51], gamma=0.5),
        lambda t: 0.5 * 0.5 ** sum(t >= m for m in (10, 50, 51)),
    ),
    "exponential": (S.Exponential(0.2, gamma=0.99), lambda t: 0.2 * 0.99**t),
    "polynomial": (
        S.Polynomial(1.0, total_steps=150, power=2.0, end=0.1),
        lambda t: 0.1 + 0.9 * (1 - min(t, 150) / 150) ** 2,
    ),
    "inverse_sqrt": (S.InverseSqrt(1e-3, warmup=16), lambda t: 1e-3 * 4 / math.sqrt(max(t, 16))),
    "linear_warmup": (
        S.LinearWarmup(S.Exponential(1.0, 0.995), warmup_steps=30, start_factor=0.2),
        lambda t: 0.995**t * (0.2 + 0.8 * min(t, 30) / 30),
    ),
    "cosine": (
        S.Cosine(2.0, total_steps=300, eta_min=0.1),
        lambda t: 0.1 + 1.9 * (1 + math.cos(math.pi * min(t, 300) / 300)) / 2,
    ),
    "sgdr_mult1": (
        S.CosineWarmRestarts(1.0, T_0=13, T_mult=1, eta_min=0.05),
        lambda t: _sgdr_closed_form(t, 1.0, 13, 1, 0.05),
    ),
    "sgdr_mult2": (
        S.CosineWarmRestarts(1.0, T_0=3, T_mult=2, eta_min=0.0),
        lambda t: _sgdr_closed_form(t, 1.0, 3, 2, 0.0),
    ),
    "sgdr_mult3": (
        S.CosineWarmRestarts(0.5, T_0=2, T_mult=3, eta_min=0.01),
        lambda t: _sgdr_closed_form(t, 0.5, 2, 3, 0.01),
    ),
    "cyclic_triangular": (
        S.Cyclic(0.1, 1.0, step_size_up=10),
        lambda t: _cyclic_closed_form(t, 0.1, 1.0, 10, 10, "triangular", 1.0),
    ),
    "cyclic_triangular2": (
        S.Cyclic(0.1, 1.0, step_size_up=6, step_size_down=14, mode="triangular2"),
        lambda t: _cyclic_closed_form(t, 0.1, 1.0, 6, 14, "triangular2", 1.0),
    ),
    "cyclic_exp_range": (
        S.Cyclic(0.1, 1.0, step_size_up=9, step_size_down=4, mode="exp_range", gamma=0.997),
        lambda t: _cyclic_closed_form(t, 0.1, 1.0, 9, 4, "exp_range", 0.997),
    ),
    "join": (
        S.Join((S.Polynomial(0.0, 20, end=1.0), S.Cosine(1.0, 100), 0.01), boundaries=(20, 120)),
        lambda t: (
            t / 20
            if t < 20
            else (1 + math.cos(math.pi * min(t - 20, 100) / 100)) / 2
            if t < 120
            else 0.01
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_schedule_matches_its_closed_form_at_every_step(name):
    schedule, closed_form = CLOSED_FORMS[name]
    assert_close_lists([schedule(t) for t in STEPS], [closed_form(t) for t in STEPS])


# ----------------------------------------------------------------------------- torch twins

TWINS = {
    "constant": (
        S.Constant(0.3),
        lambda o: torch_sched.ConstantLR(o, factor=1.0, total_iters=5),
        0.3,
    ),
    "step_decay": (
        S.StepDecay(0.5, step_size=7, gamma=0.3),
        lambda o: torch_sched.StepLR(o, step_size=7, gamma=0.3),
        0.5,
    ),
    "multistep": (
        S.MultiStep(0.5, milestones=(10, 50, 51), gamma=0.5),
        lambda o: torch_sched.MultiStepLR(o, milestones=[10, 50, 51], gamma=0.5),
        0.5,
    ),
    "exponential": (
        S.Exponential(0.2, gamma=0.99),
        lambda o: torch_sched.ExponentialLR(o, gamma=0.99),
        0.2,
    ),
    "polynomial": (
        S.Polynomial(1.0, total_steps=150, power=2.0),
        lambda o: torch_sched.PolynomialLR(o, total_iters=150, power=2.0),
        1.0,
    ),
    "linear_warmup": (
        S.LinearWarmup(0.4, warmup_steps=30, start_factor=0.1),
        lambda o: torch_sched.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=30),
        0.4,
    ),
    "linear_warmup_chained": (
        S.LinearWarmup(S.StepDecay(0.4, step_size=11, gamma=0.5), 30, start_factor=0.25),
        lambda o: torch_sched.ChainedScheduler(
            [
                torch_sched.LinearLR(o, start_factor=0.25, total_iters=30),
                torch_sched.StepLR(o, step_size=11, gamma=0.5),
            ]
        ),
        0.4,
    ),
    "cosine": (
        S.Cosine(2.0, total_steps=300, eta_min=0.1),
        lambda o: torch_sched.CosineAnnealingLR(o, T_max=300, eta_min=0.1),
        2.0,
    ),
    "sgdr_mult1": (
        S.CosineWarmRestarts(1.0, T_0=13, eta_min=0.05),
        lambda o: torch_sched.CosineAnnealingWarmRestarts(o, T_0=13, eta_min=0.05),
        1.0,
    ),
    "sgdr_mult2": (
        S.CosineWarmRestarts(1.0, T_0=3, T_mult=2),
        lambda o: torch_sched.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
        1.0,
    ),
    "sgdr_mult3": (
        S.CosineWarmRestarts(0.5, T_0=2, T_mult=3, eta_min=0.01),
        lambda o: torch_sched.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=3, eta_min=0.01),
        0.5,
    ),
    "join": (
        S.Join(
            (S.LinearWarmup(1.0, 5, start_factor=0.1), S.Cosine(1.0, 200, eta_min=0.01)),
            boundaries=(5,),
        ),
        lambda o: torch_sched.SequentialLR(
            o,
            [
                torch_sched.LinearLR(o, start_factor=0.1, total_iters=5),
                torch_sched.CosineAnnealingLR(o, T_max=200, eta_min=0.01),
            ],
            milestones=[5],
        ),
        1.0,
    ),
    # Warmup-stable-decay without the warmup (run_annealing("wsd")): lr, then linear to 0 over
    # the last 20% of the run.
    "stable_decay": (
        S.stable_decay(0.5, 250, 0.2),
        lambda o: torch_sched.SequentialLR(
            o,
            [
                torch_sched.ConstantLR(o, factor=1.0, total_iters=200),
                torch_sched.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=50),
            ],
            milestones=[200],
        ),
        0.5,
    ),
}

CYCLIC_TWINS = {
    mode: (
        S.Cyclic(0.1, 1.0, step_size_up=9, step_size_down=4, mode=mode, gamma=0.997),
        lambda o, mode=mode: torch_sched.CyclicLR(
            o,
            base_lr=0.1,
            max_lr=1.0,
            step_size_up=9,
            step_size_down=4,
            mode=mode,
            gamma=0.997,
            cycle_momentum=False,
        ),
        0.1,
    )
    for mode in ("triangular", "triangular2", "exp_range")
}


@pytest.mark.parametrize("name", sorted({**TWINS, **CYCLIC_TWINS}))
def test_schedule_matches_its_torch_lr_scheduler_twin(name):
    schedule, make_scheduler, lr = {**TWINS, **CYCLIC_TWINS}[name]
    # Cosine stays at eta_min after total_steps while CosineAnnealingLR climbs back: compare the
    # decay itself (steps 0..T_max).
    n = {"cosine": 301, "join": 5 + 201}.get(name, len(STEPS))
    expected = torch_lrs(make_scheduler, n, lr=lr)
    # torch multiplies per-step ratios (PolynomialLR, CosineAnnealingLR, LinearLR), which drifts
    # by a few ulps from the closed form; near zero only the absolute error is meaningful.
    assert_close_lists([schedule(t) for t in range(n)], expected, rtol=1e-10, atol=1e-12)


def test_cosine_stays_at_eta_min_after_total_steps():
    schedule = S.Cosine(1.0, total_steps=10, eta_min=0.2)
    assert [schedule(t) for t in (10, 11, 1000)] == [pytest.approx(0.2)] * 3


# ----------------------------------------------------------------------------- tensor steps

ALL = {
    **{f"closed_{k}": v[0] for k, v in CLOSED_FORMS.items()},
    **{k: v[0] for k, v in TWINS.items()},
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_schedule_under_vmap_over_tensor_steps_equals_python_int_steps(name):
    schedule = ALL[name]
    steps = torch.arange(0, 400)
    expected = torch.tensor([schedule(int(t)) for t in steps], dtype=torch.float64)

    batched = torch.func.vmap(schedule)(steps)
    assert batched.dtype == torch.float64 and batched.shape == steps.shape
    torch.testing.assert_close(batched, expected, rtol=1e-12, atol=1e-14)

    # float32 steps keep float32; elementwise on any shape without vmap
    as_f32 = schedule(steps.to(torch.float32).reshape(20, 20))
    assert as_f32.dtype == torch.float32
    torch.testing.assert_close(as_f32.reshape(-1), expected.float(), rtol=1e-4, atol=1e-6)


def test_schedule_of_tensor_step_returns_tensor_and_of_int_returns_float():
    schedule = S.Cosine(1.0, total_steps=10)
    assert isinstance(schedule(3), float)
    out = schedule(torch.tensor(3))
    assert isinstance(out, torch.Tensor) and out.dim() == 0 and out.dtype == torch.float64


def test_scheduled_lr_inside_vmapped_update_keeps_parameter_dtype():
    schedule = S.LinearWarmup(S.Cosine(0.1, total_steps=50), warmup_steps=5)

    def sgd_step(step, param, grad):
        return param - schedule(step) * grad

    steps = torch.tensor([0, 3, 7, 60])
    params, grads = torch.randn(4, 3), torch.randn(4, 3)
    out = torch.func.vmap(sgd_step)(steps, params, grads)
    assert out.dtype == torch.float32
    expected = torch.stack([p - schedule(int(s)) * g for s, p, g in zip(steps, params, grads)])
    torch.testing.assert_close(out, expected)


def test_schedule_is_differentiable_in_its_step():
    # d/dt of the cosine decay at t: -(lr - eta_min) * pi / (2T) * sin(pi t / T)
    schedule = S.Cosine(1.0, total_steps=100, eta_min=0.0)
    t = torch.tensor(30.0, dtype=torch.float64)
    slope = torch.func.grad(schedule)(t)
    assert slope.item() == pytest.approx(-math.pi / 200 * math.sin(math.pi * 0.3))


def test_schedules_pickle_and_compare_by_value():
    schedule = S.Join(
        (S.LinearWarmup(S.Constant(1.0), 3), S.CosineWarmRestarts(1.0, T_0=4, T_mult=2)),
        boundaries=[3],
    )
    clone = pickle.loads(pickle.dumps(schedule))
    assert clone == schedule and hash(clone) == hash(schedule)
    assert [clone(t) for t in range(40)] == [schedule(t) for t in range(40)]


# ----------------------------------------------------------------------------- registry


def test_get_schedule_builds_by_name_and_alias():
    assert S.get_schedule("cosine", lr=0.1, total_steps=10) == S.Cosine(0.1, 10)
    assert S.get_schedule("sgdr", lr=0.1, T_0=5) == S.CosineWarmRestarts(0.1, 5)
    assert S.get_schedule("step", lr=0.1, step_size=5) == S.StepDecay(0.1, 5)
    assert S.schedule_names() == (
        "constant",
        "cosine",
        "cosine_warm_restarts",
        "cyclic",
        "exponential",
        "inverse_sqrt",
        "join",
        "linear_warmup",
        "multistep",
        "polynomial",
        "sgdr",
        "step",
        "step_decay",
    )


def test_get_schedule_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown schedule 'cosin'.*cosine.*sgdr"):
        S.get_schedule("cosin", lr=0.1)


def test_get_schedule_bad_keyword_names_the_fields():
    with pytest.raises(ValueError, match=r"schedule 'cosine' \(lr, total_steps, eta_min\)"):
        S.get_schedule("cosine", lr=0.1, T_max=10)


# ----------------------------------------------------------------------------- bad input

BAD = [
    (S.Constant, dict(lr=-1.0), "lr must be >= 0"),
    (S.Constant, dict(lr=float("nan")), "lr must be finite"),
    (S.StepDecay, dict(lr=0.1, step_size=0), "step_size must be >= 1"),
    (S.StepDecay, dict(lr=0.1, step_size=2.5), "step_size must be an integer"),
    (S.StepDecay, dict(lr=0.1, step_size=3, gamma=-0.5), "gamma must be >= 0"),
    (S.MultiStep, dict(lr=0.1, milestones=[]), "milestones must not be empty"),
    (S.MultiStep, dict(lr=0.1, milestones=[5, 3]), "strictly increasing"),
    (S.MultiStep, dict(lr=0.1, milestones=5), "sequence of integers"),
    (S.Exponential, dict(lr=0.1, gamma=0.0), "gamma must be > 0"),
    (S.Exponential, dict(lr=0.1, gamma=float("inf")), "gamma must be finite"),
    (S.Polynomial, dict(lr=0.1, total_steps=0), "total_steps must be >= 1"),
    (S.Polynomial, dict(lr=0.1, total_steps=5, power=0.0), "power must be > 0"),
    (S.Polynomial, dict(lr=0.1, total_steps=5, end=-1.0), "end must be >= 0"),
    (S.InverseSqrt, dict(lr=0.1, warmup=0), "warmup must be >= 1"),
    (S.LinearWarmup, dict(schedule="cosine", warmup_steps=3), "schedule must be a Schedule"),
    (S.LinearWarmup, dict(schedule=0.1, warmup_steps=-1), "warmup_steps must be >= 0"),
    (S.LinearWarmup, dict(schedule=0.1, warmup_steps=3, start_factor=1.5), "start_factor"),
    (S.Cosine, dict(lr=0.1, total_steps=True), "total_steps must be an integer"),
    (S.Cosine, dict(lr=0.1, total_steps=10, eta_min=-0.1), "eta_min must be >= 0"),
    (S.CosineWarmRestarts, dict(lr=0.1, T_0=0), "T_0 must be >= 1"),
    (S.CosineWarmRestarts, dict(lr=0.1, T_0=2, T_mult=1.5), "T_mult must be an integer"),
    (S.Cyclic, dict(base_lr=0.1, max_lr=1.0, step_size_up=0), "step_size_up must be >= 1"),
    (S.Cyclic, dict(base_lr=0.1, max_lr=1.0, step_size_down=0), "step_size_down must be >= 1"),
    (S.Cyclic, dict(base_lr=0.1, max_lr=1.0, mode="sine"), "mode must be one of triangular"),
    (S.Cyclic, dict(base_lr=0.1, max_lr=1.0, gamma=0.0), "gamma must be > 0"),
    (S.Join, dict(schedules=(), boundaries=()), "schedules must not be empty"),
    (S.Join, dict(schedules=(0.1, 0.2), boundaries=()), r"len\(boundaries\)"),
    (S.Join, dict(schedules=(0.1, 0.2, 0.3), boundaries=(5, 5)), "strictly increasing"),
    (S.Join, dict(schedules=(0.1, 0.2), boundaries=(0,)), "boundaries.* must be >= 1"),
    (S.Join, dict(schedules=S.Constant(0.1), boundaries=()), "sequence of schedules"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD, ids=[f"{c.__name__}-{m}" for c, _, m in BAD])
def test_bad_hyperparameters_raise_a_clear_error(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_bad_python_step_raises(step):
    with pytest.raises(ValueError, match="step must be"):
        S.Cosine(1.0, 10)(step)


def test_stable_decay_lengths_and_errors():
    # The decay takes round(fraction * total) steps, at least one, at most the whole run.
    assert S.stable_decay(1.0, 10, 0.2)(7) == 1.0
    assert S.stable_decay(1.0, 10, 0.2)(9) == pytest.approx(0.5)
    assert S.stable_decay(1.0, 10, 0.2)(10) == 0.0
    assert S.stable_decay(1.0, 3, 0.1)(2) == 1.0  # one decay step, reaching 0 at step 3
    assert S.stable_decay(1.0, 3, 0.1)(3) == 0.0
    assert S.stable_decay(1.0, 1, 0.5) == S.Polynomial(1.0, total_steps=1)
    assert S.stable_decay(1.0, 4, 1.0) == S.Polynomial(1.0, total_steps=4)
    for fraction in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="decay_fraction"):
            S.stable_decay(1.0, 10, fraction)
    with pytest.raises(ValueError, match="total_steps"):
        S.stable_decay(1.0, 0, 0.2)


def test_a_schedule_of_a_batched_lr_runs_under_vmap():
    # l2o-eval tunes a population of lrs at once: each member's annealing holds its own lr.
    lrs = torch.tensor([0.1, 0.2])
    at = torch.func.vmap(lambda lr: S.stable_decay(lr, 10, 0.2)(torch.tensor([0, 9, 10])))(lrs)
    torch.testing.assert_close(at.float(), torch.tensor([[0.1, 0.05, 0.0], [0.2, 0.1, 0.0]]))
