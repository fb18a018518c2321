"""Gradient estimators (l2o.meta.estimators): TBPTT, antithetic ES and PES."""

import io
import math

import pytest
import torch
from _meta_fixtures import MomentumLOpt, Quadratic, QuadraticFamily
from torch._dynamo.utils import counters

from l2o.meta.base import GradientEstimator
from l2o.meta.estimators import (
    ES,
    PES,
    TRUNCATION_WEIGHTINGS,
    TruncatedBPTT,
    get_estimator,
    median_episode_length,
    truncation_weight,
)
from l2o.meta.losses import META_LOSSES, get_meta_loss
from l2o.meta.unroll import init_carry, unroll


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _meta(lopt):
    return lopt.init_meta(_gen())


def _shifted(meta, key, delta):
    return {k: v + delta if k == key else v for k, v in meta.items()}


def _truncation_meta_loss(lopt, task, carry, num_steps, meta, meta_loss):
    """Population-mean meta-loss of one truncation from ``carry`` (no estimator involved)."""
    loss = get_meta_loss(meta_loss)
    out = unroll(lopt.rule(meta), task, carry, num_steps, eval_mode=loss.eval_mode)
    return loss(out.terms).mean()


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("meta_loss", sorted(META_LOSSES))
def test_tbptt_meta_gradient_matches_central_differences(meta_loss, checkpoint):
    lopt, task = MomentumLOpt(lr=0.05, beta=0.6, decay=0.1), Quadratic(dim=3, noise=0.3)
    est = TruncatedBPTT(
        lopt,
        task,
        population=3,
        truncation=3,
        horizon=9,
        meta_loss=meta_loss,
        checkpoint=checkpoint,
    )
    meta, g = _meta(lopt), _gen()
    # Second truncation: the carry holds momentum and a known initial loss.
    state = est.estimate(meta, est.init(meta, g), g).state
    result = est.estimate(meta, state, g)
    h = 1e-6
    for key in meta:
        plus, minus = (
            _truncation_meta_loss(lopt, task, state["carry"], 3, _shifted(meta, key, s), meta_loss)
            for s in (h, -h)
        )
        fd = (plus - minus) / (2 * h)
        torch.testing.assert_close(result.grads[key], fd, rtol=1e-5, atol=1e-9)
        assert fd.abs() > 1e-4  # the check has something to compare


def _exact_truncation_gradient(lopt, task, meta):
    """TBPTT on a problem where every member is identical: the exact truncated gradient."""
    est = TruncatedBPTT(lopt, task, population=1, truncation=4, horizon=8)
    return est.estimate(meta, est.init(meta, _gen()), _gen()).grads


def _mean_and_stderr(samples, key):
    values = torch.stack([s[key] for s in samples])
    return values.mean(), values.std() / math.sqrt(len(values))


def _cosine(a, b):
    a, b = torch.stack(list(a.values())), torch.stack(list(b.values()))
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("cls", [ES, PES])
def test_es_and_pes_agree_with_tbptt_within_standard_error(cls):
    lopt, task = MomentumLOpt(lr=0.1, beta=0.8), Quadratic(fixed=True, curvatures=(1.0, 5.0))
    meta = _meta(lopt)
    true = _exact_truncation_gradient(lopt, task, meta)
    est = cls(lopt, task, population=512, truncation=4, horizon=8, sigma=1e-3)
    g = _gen(1)
    samples = [est.estimate(meta, est.init(meta, g), g).grads for _ in range(20)]
    for key in meta:
        mean, stderr = _mean_and_stderr(samples, key)
        assert abs(mean - true[key]) < 4 * stderr, (key, mean, true[key], stderr)
        assert stderr < 0.1 * abs(true[key])  # the z-test has power
    mean = {k: torch.stack([s[k] for s in samples]).mean() for k in meta}
    assert _cosine(mean, true) > 0.99
    # A single estimate is noisy but points the right way.
    assert _cosine(samples[0], true) > 0.5


def _estimates(est, meta, g, count):
    """The first ``count`` estimates of ``est`` from a fresh init, in order."""
    state, results = est.init(meta, g), []
    for _ in range(count):
        results.append(est.estimate(meta, state, g))
        state = results[-1].state
    return results


def _episode_sum(est, meta, g):
    """Sum of an estimator's estimates over one whole episode (from a fresh init)."""
    state, total = est.init(meta, g), None
    while True:
        result = est.estimate(meta, state, g)
        state = result.state
        total = result.grads if total is None else {k: total[k] + result.grads[k] for k in total}
        if result.metrics["episode_done"]:
            return total


def _full_episode_gradient(lopt, task, meta, truncation, horizon):
    """Gradient of the sum of an episode's truncation meta-losses by BPTT through the whole
    episode (the carry is never detached): the objective PES is unbiased for."""
    meta = {k: v.detach().requires_grad_() for k, v in meta.items()}
    rule, loss = lopt.rule(meta), get_meta_loss("train_mean")
    carry, total = init_carry(rule, task, torch.tensor([0])), 0.0
    for start in range(0, horizon, truncation):
        out = unroll(rule, task, carry, min(truncation, horizon - start))
        carry, total = out.carry, total + loss(out.terms).mean()
    return dict(zip(meta, torch.autograd.grad(total, list(meta.values()))))


def test_pes_is_unbiased_for_the_whole_episode_where_truncated_bptt_is_biased():
    # Ill-conditioned quadratic, heavy-ball with a learned step size, truncations of 2 steps
    # out of 8: the whole episode says "smaller steps", each short truncation says "larger".
    lopt = MomentumLOpt(lr=0.1, beta=0.5)
    task = Quadratic(fixed=True, curvatures=(0.1, 10.0))
    meta = _meta(lopt)
    true = _full_episode_gradient(lopt, task, meta, truncation=2, horizon=8)
    tbptt = _episode_sum(
        TruncatedBPTT(lopt, task, population=1, truncation=2, horizon=8), meta, _gen()
    )
    assert true["log_lr"] < 0 < tbptt["log_lr"]

    pes = PES(lopt, task, population=1024, truncation=2, horizon=8, sigma=1e-3)
    g = _gen(2)
    samples = [_episode_sum(pes, meta, g) for _ in range(20)]
    for key in meta:
        mean, stderr = _mean_and_stderr(samples, key)
        assert abs(mean - true[key]) < 4 * stderr, (key, mean, true[key], stderr)
    mean, stderr = _mean_and_stderr(samples, "log_lr")
    assert abs(tbptt["log_lr"] - true["log_lr"]) > 10 * stderr
    assert mean < 0


def test_an_episode_restarts_at_the_horizon_with_fresh_instances():
    lopt, task = MomentumLOpt(), Quadratic(noise=0.1)
    est = TruncatedBPTT(lopt, task, population=3, truncation=2, horizon=5)
    meta, g = _meta(lopt), _gen()
    state = est.init(meta, g)
    first_seeds = state["carry"]["seeds"].clone()
    progress = []
    for _ in range(3):  # truncations of 2, 2 and (shortened) 1 steps
        result = est.estimate(meta, state, g)
        state = result.state
        progress.append((result.metrics["truncation"], result.metrics["episode_progress"]))
        assert result.metrics["inner_steps"] == 3 * (2 if len(progress) < 3 else 1)
    assert progress == [(0.0, 0.4), (1.0, 0.8), (2.0, 1.0)]
    assert result.metrics["episode_done"] == 1.0 and result.metrics["episode"] == 0.0
    carry = state["carry"]
    assert state["episode"] == 1 and state["truncation"] == 0
    assert carry["step"].tolist() == [0, 0, 0]
    assert not torch.equal(carry["seeds"], first_seeds)
    torch.testing.assert_close(carry["params"], task.population_init(carry["seeds"].tolist()))
    assert all(torch.count_nonzero(m) == 0 for m in carry["opt_state"]["m"].values())
    assert est.estimate(meta, state, g).metrics["episode"] == 1.0


@pytest.mark.parametrize("name", ["tbptt", "pes"])
def test_an_update_schedule_anneals_over_each_episodes_drawn_length(name):
    from l2o.optim.schedules import run_annealing

    lopt, task = MomentumLOpt(), Quadratic(noise=0.1)
    kwargs = dict(population=2, truncation=3, horizon=12, horizon_schedule="log_uniform")
    est = get_estimator(name, lopt=lopt, task=task, update_schedule="cosine", **kwargs)
    meta, g = _meta(lopt), _gen()
    state = est.init(meta, g)
    for _ in range(2):  # the second truncation starts mid-episode
        horizon, carry = int(state["horizon"]), state["carry"]
        result = est.estimate(meta, state, _gen(1))
        if name == "tbptt":
            expected = unroll(
                lopt.rule(meta),
                task,
                carry,
                3,
                update_schedule=run_annealing("cosine", horizon),
            ).carry["params"]
            torch.testing.assert_close(result.state["carry"]["params"], expected)
        state = result.state
    constant = get_estimator(name, lopt=lopt, task=task, **kwargs)
    first = constant.init(meta, _gen())
    scheduled = est.init(meta, _gen())
    a = constant.estimate(meta, first, _gen(1)).state["carry"]["params"]["w"]
    b = est.estimate(meta, scheduled, _gen(1)).state["carry"]["params"]["w"]
    assert not torch.allclose(a, b)


def test_pes_accumulates_perturbations_until_the_episode_ends():
    lopt, task = MomentumLOpt(), Quadratic(noise=0.1)
    est = PES(lopt, task, population=4, truncation=2, horizon=4, sigma=0.1)
    meta, g = _meta(lopt), _gen()
    state = est.init(meta, g)
    assert state["carry"]["seeds"][:2].tolist() == state["carry"]["seeds"][2:].tolist()
    assert all(torch.count_nonzero(a) == 0 for a in state["accumulator"].values())
    mid = est.estimate(meta, state, g).state
    for xi in mid["accumulator"].values():
        assert xi.shape[0] == 2 and torch.count_nonzero(xi) == xi.numel()
    # Antithetic particles now carry different inner states.
    params = mid["carry"]["params"]["w"]
    assert not torch.allclose(params[:2], params[2:])
    end = est.estimate(meta, mid, g).state
    assert end["episode"] == 1
    assert all(torch.count_nonzero(a) == 0 for a in end["accumulator"].values())


def test_es_pairs_share_instances_and_carry_one_state_each():
    lopt, task = MomentumLOpt(), Quadratic(noise=0.1)
    est = ES(lopt, task, population=6, truncation=2, horizon=6)
    meta, g = _meta(lopt), _gen()
    state = est.init(meta, g)
    assert state["carry"]["seeds"].shape == (3,)
    result = est.estimate(meta, state, g)
    assert result.state["carry"]["params"]["w"].shape == (3, 2)
    assert result.metrics["inner_steps"] == 6 * 2


def test_log_uniform_horizons_stay_in_range_and_vary():
    lopt = MomentumLOpt()
    est = TruncatedBPTT(
        lopt, Quadratic(), population=1, truncation=2, horizon=64, horizon_schedule="log_uniform"
    )
    meta, g = _meta(lopt), _gen()
    horizons = [est.init(meta, g)["horizon"] for _ in range(300)]
    assert min(horizons) >= 2 and max(horizons) <= 64
    assert len(set(horizons)) > 20
    # Log-uniform: about as many episodes in [2, 8) as in [16, 64).
    short = sum(h < 8 for h in horizons)
    long = sum(h >= 16 for h in horizons)
    assert 0.6 < short / long < 1.6


@pytest.mark.parametrize(
    ("truncation", "min_horizon", "horizon"), [(4, None, 100), (20, 100, 1000)]
)
def test_median_episode_length_is_the_median_of_the_estimators_own_draws(
    truncation, min_horizon, horizon
):
    lopt = MomentumLOpt()
    config = dict(truncation=truncation, horizon=horizon, horizon_schedule="log_uniform")
    if min_horizon is not None:
        config["min_horizon"] = min_horizon
    est = TruncatedBPTT(lopt, Quadratic(), population=1, **config)
    meta, g = _meta(lopt), _gen()
    drawn = torch.tensor([float(est.init(meta, g)["horizon"]) for _ in range(2000)])
    median = median_episode_length(config)
    assert median == round(math.sqrt((min_horizon or truncation) * horizon))
    # The empirical median of 2,000 draws is within a few percent of the formula's.
    assert abs(float(drawn.median()) / median - 1) < 0.06


def test_median_episode_length_of_constant_and_unreadable_configs():
    assert median_episode_length({"horizon": 200, "truncation": 100}) == 200
    assert median_episode_length({"horizon": 200, "horizon_schedule": "constant"}) == 200
    assert median_episode_length({}) is None
    assert median_episode_length({"horizon": "200"}) is None
    assert median_episode_length({"horizon": 200, "horizon_schedule": "cubic"}) is None
    assert median_episode_length({"horizon": 10, "horizon_schedule": "log_uniform"}) is None
    assert (
        median_episode_length({"horizon": 10, "horizon_schedule": "log_uniform", "min_horizon": 20})
        is None
    )


def test_a_task_family_is_resampled_per_episode_and_rebuilt_from_its_seed():
    lopt, family = MomentumLOpt(), QuadraticFamily()
    est = ES(lopt, family, population=2, truncation=1, horizon=1)
    meta, g = _meta(lopt), _gen()
    state = est.init(meta, g)
    task_seeds = [state["task_seed"]]
    for _ in range(6):
        state = est.estimate(meta, state, g).state
        task_seeds.append(state["task_seed"])
    assert len(set(task_seeds)) == 7
    dims = {est.task_for(s).dim for s in task_seeds}
    assert len(dims) > 1  # different task structures over episodes
    built = family.built
    assert est.task_for(task_seeds[-1]) is est.task_for(task_seeds[-1])  # cached
    assert family.built == built


@pytest.mark.parametrize("name", ["tbptt", "es", "pes"])
def test_state_round_trips_through_torch_save_and_resumes_identically(name):
    kwargs = {"sigma": 0.05} if name != "tbptt" else {}
    lopt = MomentumLOpt()

    def make():
        return get_estimator(
            name,
            lopt=lopt,
            task=QuadraticFamily(),
            population=4,
            truncation=2,
            horizon=5,
            horizon_schedule="log_uniform",
            meta_loss="clipped",
            **kwargs,
        )

    est, meta, g = make(), _meta(lopt), _gen(3)
    state = est.init(meta, g)
    for _ in range(2):
        state = est.estimate(meta, state, g).state
    buffer = io.BytesIO()
    torch.save({"state": state, "generator": g.get_state()}, buffer)
    continued = [est.estimate(meta, state, g) for _ in range(1)]
    for _ in range(3):
        continued.append(est.estimate(meta, continued[-1].state, g))

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_est, resumed_g = make(), torch.Generator()
    resumed_g.set_state(saved["generator"])
    resumed = [resumed_est.estimate(meta, saved["state"], resumed_g)]
    for _ in range(3):
        resumed.append(resumed_est.estimate(meta, resumed[-1].state, resumed_g))
    for a, b in zip(continued, resumed):
        torch.testing.assert_close(a.grads, b.grads, rtol=0, atol=0)
        assert a.metrics == b.metrics
    torch.testing.assert_close(continued[-1].state, resumed[-1].state, rtol=0, atol=0)


def test_nonfinite_inner_losses_are_reported_and_the_members_restart():
    lopt = MomentumLOpt(lr=1e30)
    est = TruncatedBPTT(lopt, Quadratic(), population=2, truncation=20, horizon=100)
    meta, g = _meta(lopt), _gen()
    first = est.init(meta, g)
    result = est.estimate(meta, first, g)
    assert result.metrics["nonfinite"] > 0 and result.metrics["member_resets"] == 2.0
    assert result.metrics["episode_done"] == 0.0
    assert result.state["episode"] == 0 and result.state["carry"]["step"].tolist() == [0, 0]
    assert result.state["episode_step"] == 20
    assert not set(result.state["carry"]["seeds"].tolist()) & set(first["carry"]["seeds"].tolist())


class _DivergesForSeeds(Quadratic):
    """A quadratic whose instances with a seed in ``bad`` are so steep that training diverges."""

    def __init__(self):
        super().__init__(dim=2, noise=0.0)
        self.bad: set[int] = set()

    def _problem(self, seed):
        h, c = super()._problem(seed)
        return (h * 1e300 if int(seed) in self.bad else h), c


@pytest.mark.parametrize("name", ["tbptt", "es", "pes"])
def test_one_diverging_member_restarts_alone_and_is_left_out_of_the_estimate(name):
    lopt, task = MomentumLOpt(lr=0.1), _DivergesForSeeds()
    est = get_estimator(name, lopt=lopt, task=task, population=4, truncation=2, horizon=10)
    meta, g = _meta(lopt), _gen()
    state = est.init(meta, g)
    seeds = state["carry"]["seeds"].tolist()
    task.bad = {seeds[1]}
    result = est.estimate(meta, state, g)
    assert result.metrics["nonfinite"] > 0 and result.metrics["member_resets"] == 1.0
    assert result.metrics["episode_done"] == 0.0 and math.isfinite(result.metrics["meta_loss"])
    carry = result.state["carry"]
    rows = {1, 1 + est.population // 2} if name == "pes" else {1}
    for row, (seed, step) in enumerate(zip(carry["seeds"].tolist(), carry["step"].tolist())):
        assert (step == 0) == (row in rows) and (seed == seeds[row]) == (row not in rows)
    if name != "tbptt":  # the diverged pair is dropped: the estimate stays usable
        assert all(torch.isfinite(v).all() for v in result.grads.values())
    if name == "pes":
        assert all(float(a[1].abs().sum()) == 0 for a in result.state["accumulator"].values())
        assert all(float(a[0].abs().sum()) > 0 for a in result.state["accumulator"].values())
    following = est.estimate(meta, result.state, g)  # members now at different steps
    assert following.metrics["nonfinite"] == 0.0
    assert all(torch.isfinite(v).all() for v in following.grads.values())


def test_the_same_generator_seed_gives_the_same_estimates():
    lopt = MomentumLOpt()
    runs = []
    for _ in range(2):
        est = PES(lopt, Quadratic(noise=0.2), population=4, truncation=2, horizon=4, sigma=0.1)
        runs.append([r.grads for r in _estimates(est, _meta(lopt), _gen(7), 3)])
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


@pytest.mark.parametrize(("truncation", "graphs"), [(3, 1), (2, 2)])
def test_compiled_pes_gives_the_eager_estimates(truncation, graphs):
    """``compile=True`` (one compiled scan per truncation) over episodes of 5 steps: the last
    truncation of each episode is shorter and reuses the graph (its length is dynamic), except
    a truncation of one step, which Dynamo's size-1 specialisation compiles on its own; the
    estimates are the eager ones."""
    lopt = MomentumLOpt()
    runs = []
    for compile in (False, True):
        est = PES(
            lopt,
            Quadratic(noise=0.2),
            population=4,
            truncation=truncation,
            horizon=5,
            sigma=0.1,
            compile=compile,
        )
        torch._dynamo.reset()
        counters.clear()
        # Four truncations: across an episode boundary.
        runs.append([r.grads for r in _estimates(est, _meta(lopt), _gen(7), 4)])
        assert counters["stats"]["unique_graphs"] == (graphs if compile else 0)
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-7)


def test_compiled_tbptt_gives_the_eager_estimates():
    """``compile=True`` with TBPTT (each inner step a compiled graph with its backward) over
    episodes of 5 steps in truncations of 2, across an episode boundary: the eager estimates."""
    lopt = MomentumLOpt()
    runs = []
    for compile in (False, True):
        est = TruncatedBPTT(
            lopt, Quadratic(noise=0.2), population=3, truncation=2, horizon=5, compile=compile
        )
        torch._dynamo.reset()
        counters.clear()
        runs.append([r.grads for r in _estimates(est, _meta(lopt), _gen(7), 4)])
        assert counters["stats"]["unique_graphs"] == int(compile)  # compiled only when asked
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-7)


def test_tbptt_refuses_compile_with_checkpointing():
    with pytest.raises(ValueError, match=r"estimator\.compile=false"):
        TruncatedBPTT(MomentumLOpt(), Quadratic(), checkpoint=True, compile=True)
    with pytest.raises(ValueError, match="compile must be True or False"):
        TruncatedBPTT(MomentumLOpt(), Quadratic(), compile="yes")


def test_metrics_report_the_truncation():
    lopt = MomentumLOpt()
    result = get_estimator("es", lopt=lopt, task=Quadratic(), population=4, truncation=3, horizon=9)
    metrics = result.estimate(_meta(lopt), result.init(_meta(lopt), _gen()), _gen()).metrics
    assert set(metrics) >= {
        "meta_loss",
        "inner_loss",
        "nonfinite",
        "inner_steps",
        "truncation",
        "episode",
        "episode_progress",
        "horizon",
        "episode_done",
    }
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["inner_steps"] == 12.0 and metrics["episode_progress"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("weighting", TRUNCATION_WEIGHTINGS)
def test_truncation_weights_average_one_over_an_episode_and_grow_towards_its_end(weighting):
    horizon, k = 1000, 10
    weights = [truncation_weight(weighting, start, k, horizon) for start in range(0, horizon, k)]
    # The midpoint rule: exact for the linear weight, 1 - 1/(4 n^2) for the quadratic one.
    assert sum(weights) / len(weights) == pytest.approx(1.0, abs=1e-4)
    assert weights == sorted(weights)
    if weighting != "uniform":
        assert weights[0] < 0.02 and weights[-1] > 1.98
    with pytest.raises(ValueError, match="truncation_weighting"):
        truncation_weight("final", 0, k, horizon)


@pytest.mark.parametrize("name", ["tbptt", "pes"])
def test_a_weighted_truncation_estimate_is_the_uniform_one_times_its_weight(name):
    """Over an episode of 3 truncations of 2 steps (with a shorter last one), each estimate is
    the uniform estimator's on the same draws times 2x / 3x^2 of the truncation's midpoint."""
    lopt = MomentumLOpt()
    runs = {}
    for weighting in TRUNCATION_WEIGHTINGS:
        est = get_estimator(
            name,
            lopt=lopt,
            task=Quadratic(noise=0.2),
            population=4,
            truncation=2,
            horizon=5,
            truncation_weighting=weighting,
        )
        runs[weighting] = [
            (r.grads, r.metrics["truncation_weight"])
            for r in _estimates(est, _meta(lopt), _gen(3), 3)
        ]
    midpoints = [1 / 5, 3 / 5, 4.5 / 5]
    for weighting, factor in (("linear", lambda x: 2 * x), ("quadratic", lambda x: 3 * x * x)):
        for (grads, weight), (uniform, one), x in zip(runs[weighting], runs["uniform"], midpoints):
            assert one == 1.0 and weight == pytest.approx(factor(x))
            expected = {key: g * factor(x) for key, g in uniform.items()}
            torch.testing.assert_close(grads, expected, rtol=1e-6, atol=1e-9)
            assert any(bool(g.abs().max() > 1e-6) for g in uniform.values())


def test_get_estimator_builds_registered_estimators_and_rejects_unknown_names():
    lopt, task = MomentumLOpt(), Quadratic()
    for name, cls in [("tbptt", TruncatedBPTT), ("es", ES), ("pes", PES)]:
        est = get_estimator(name, lopt=lopt, task=task, population=2, truncation=1, horizon=2)
        assert type(est) is cls and isinstance(est, GradientEstimator) and est.name == name
    with pytest.raises(ValueError, match=r"unknown estimator 'adam'.*tbptt"):
        get_estimator("adam", lopt=lopt, task=task)


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("tbptt", {"truncation": 0}, "truncation"),
        ("tbptt", {"horizon": 0}, "horizon"),
        ("tbptt", {"population": 0}, "population"),
        ("tbptt", {"population": 2.5}, "population"),
        ("tbptt", {"truncation": 10, "horizon": 5}, "truncation"),
        ("tbptt", {"meta_loss": "accuracy"}, "meta_loss"),
        ("tbptt", {"horizon_schedule": "cosine"}, "horizon_schedule"),
        ("pes", {"update_schedule": "exponential"}, "update_schedule"),
        ("tbptt", {"horizon_schedule": "log_uniform", "min_horizon": 200}, "min_horizon"),
        ("es", {"population": 3}, "population"),
        ("pes", {"population": 5}, "population"),
        ("es", {"sigma": 0.0}, "sigma"),
        ("pes", {"sigma": -1.0}, "sigma"),
        ("pes", {"sigma": float("nan")}, "sigma"),
        ("pes", {"truncation_weighting": "final"}, "truncation_weighting"),
    ],
)
def test_bad_configuration_is_rejected_naming_the_key(name, kwargs, key):
    config = {"population": 4, "truncation": 2, "horizon": 10, **kwargs}
    with pytest.raises(ValueError, match=key):
        get_estimator(name, lopt=MomentumLOpt(), task=Quadratic(), **config)


def test_task_must_be_a_task_or_a_family():
    with pytest.raises(TypeError, match="Task or a TaskFamily"):
        TruncatedBPTT(MomentumLOpt(), "quadratic", population=1, truncation=1, horizon=1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tbptt", "es", "pes"])
def test_estimates_on_cuda_match_cpu(name):
    lopt = MomentumLOpt()
    kwargs = {} if name == "tbptt" else {"sigma": 0.05}
    results = {}
    for device in ["cpu", "cuda"]:
        est = get_estimator(
            name,
            lopt=lopt,
            task=Quadratic(noise=0.2),
            population=4,
            truncation=2,
            horizon=4,
            device=device,
            **kwargs,
        )
        meta = {k: v.to(device) for k, v in _meta(lopt).items()}
        g = _gen(5)
        state = est.init(meta, g)
        assert state["carry"]["params"]["w"].device.type == device
        result = est.estimate(meta, est.estimate(meta, state, g).state, g)
        assert all(v.device.type == device for v in result.grads.values())
        results[device] = {k: v.cpu() for k, v in result.grads.items()}
    torch.testing.assert_close(results["cuda"], results["cpu"])


@pytest.mark.parametrize("name", ["tbptt", "es", "pes"])
def test_estimators_train_the_library_lopt_on_a_library_task_family(name):
    from l2o.learned import get_lopt
    from l2o.tasks import get_family

    lopt = get_lopt("mlp")
    kwargs = {} if name == "tbptt" else {"sigma": 0.01}
    est = get_estimator(
        name,
        lopt=lopt,
        task=get_family("quadratic"),
        population=2,
        truncation=2,
        horizon=3,
        **kwargs,
    )
    g = _gen()
    meta = lopt.init_meta(g)
    state = est.init(meta, g)
    for _ in range(2):  # the second truncation ends the episode and samples a new task
        result = est.estimate(meta, state, g)
        state = result.state
        assert result.metrics["nonfinite"] == 0.0
        assert set(result.grads) == set(meta)
        for key, grad in result.grads.items():
            assert grad.shape == meta[key].shape and torch.isfinite(grad).all()
        assert any(grad.abs().sum() > 0 for grad in result.grads.values())
    assert result.metrics["episode_done"] == 1.0 and state["episode"] == 1
