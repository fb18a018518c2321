"""L-BFGS: the rule and its torch.optim class against torch.optim.LBFGS and scipy."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, rosen, rosen_der

import l2o.optim as O
from l2o.optim.base import apply_updates
from l2o.optim.lbfgs import LBFGS, LBFGSOptimizer, strong_wolfe


def _problem(seed: int = 0, hidden: int = 8):
    """A small non-convex regression: a tanh MLP fitting sin(x1 + x2 + x3), in float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).double()
    return model, x, y


def _functional_loss(model, x, y):
    def loss_fn(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    return loss_fn


def _closure(opt, model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    return closure


def _params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _rule_step(rule, state, params, loss_fn, step):
    grads = torch.func.grad(loss_fn)(params)
    updates, state = rule.update(grads, state, params, step=step, loss_fn=loss_fn)
    return apply_updates(params, updates), state


def _rule_state_from_torch(torch_state, rule, params):
    """The rule state equivalent to a torch.optim.LBFGS state (its lists packed into buffers)."""
    state = rule.init(params)
    state["n_iter"] = torch.tensor(torch_state.get("n_iter", 0))
    state["func_evals"] = torch.tensor(torch_state.get("func_evals", 0))
    if "d" not in torch_state:
        return state
    k = len(torch_state["old_dirs"])
    if k:
        state["old_dirs"][:k] = torch.stack(torch_state["old_dirs"])
        state["old_stps"][:k] = torch.stack(torch_state["old_stps"])
        state["ro"][:k] = torch.stack([torch.as_tensor(r) for r in torch_state["ro"]])
    state["history_len"] = torch.tensor(k)
    state["d"] = torch_state["d"].clone()
    state["prev_flat_grad"] = torch_state["prev_flat_grad"].clone()
    for name in ("t", "H_diag", "prev_loss"):
        state[name] = torch.tensor(float(torch_state[name]), dtype=torch.float64)
    return state


def _assert_models_close(a, b, **tol):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=lambda m, name=name: f"{name}: {m}", **tol)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("max_iter", [10, 4])
def test_every_update_equals_a_torch_lbfgs_step_from_the_same_state(line_search_fn, max_iter):
    # 50 torch.optim.LBFGS steps; before each, the rule gets torch's parameters and state and
    # makes the same step. Its iterates are torch's bit for bit (same directions, trial points
    # and step lengths); only params + updates rounds once at the end (<= 1 ulp).
    model, x, y = _problem()
    hyper = dict(line_search_fn=line_search_fn, max_iter=max_iter, history_size=10)
    opt = torch.optim.LBFGS(model.parameters(), **hyper)
    closure = _closure(opt, model, x, y)
    rule = LBFGS(**hyper)
    loss_fn = _functional_loss(model, x, y)
    moved = 0
    for step in range(50):
        params = _params_of(model)
        state = _rule_state_from_torch(opt.state[next(model.parameters())], rule, params)
        opt.step(closure)
        new_params, new_state = _rule_step(rule, state, params, loss_fn, step)

        reference = opt.state[next(model.parameters())]
        for k, p in model.named_parameters():
            torch.testing.assert_close(new_params[k], p.detach(), rtol=0, atol=4e-16)
        moved += any(not torch.equal(new_params[k], params[k]) for k in params)
        assert int(new_state["n_iter"]) == reference["n_iter"]
        assert int(new_state["func_evals"]) == reference["func_evals"]
        assert int(new_state["history_len"]) == len(reference["old_dirs"])
        assert float(new_state["t"]) == float(reference["t"])
        assert float(new_state["H_diag"]) == float(reference["H_diag"])
        assert torch.equal(new_state["d"], reference["d"])
        assert torch.equal(new_state["prev_flat_grad"], reference["prev_flat_grad"])
        k = len(reference["old_dirs"])
        assert torch.equal(new_state["old_dirs"][:k], torch.stack(reference["old_dirs"]))
        assert torch.equal(new_state["old_stps"][:k], torch.stack(reference["old_stps"]))
    assert moved >= 40, "the comparison should cover steps that move the parameters"


@pytest.mark.parametrize(
    "hyper",
    [
        dict(max_iter=1),  # one fixed-length L-BFGS iteration per step
        dict(max_iter=2, line_search_fn="strong_wolfe"),  # one searched iteration per step
    ],
    ids=["fixed_step", "strong_wolfe"],
)
def test_rule_and_class_follow_torch_lbfgs_for_50_steps(hyper):
    # Free-running trajectories. With one iteration per step they stay together to ~1e-12;
    # with many iterations per step, the one rounding of params + updates per step (see the
    # test above) is amplified chaotically on a non-convex loss, so free runs of ~1000
    # iterations drift apart by O(1) — that case is covered step by step above.
    model, x, y = _problem()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt, ref = (
        LBFGSOptimizer(ours.parameters(), **hyper),
        torch.optim.LBFGS(theirs.parameters(), **hyper),
    )
    our_calls, their_calls = [], []
    closure = _closure(opt, ours, x, y, our_calls)
    ref_closure = _closure(ref, theirs, x, y, their_calls)
    rule, loss_fn = LBFGS(**hyper), _functional_loss(model, x, y)
    params = _params_of(model)
    state = rule.init(params)
    for step in range(50):
        loss = opt.step(closure)
        ref_loss = ref.step(ref_closure)
        params, state = _rule_step(rule, state, params, loss_fn, step)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
        _assert_models_close(ours, theirs, rtol=1e-9, atol=1e-10)
        for k, p in theirs.named_parameters():
            torch.testing.assert_close(params[k], p.detach(), rtol=1e-9, atol=1e-10)
    assert len(our_calls) == len(their_calls)  # no extra closure calls
    assert ref.state[next(theirs.parameters())]["func_evals"] == int(state["func_evals"])
    first, last = (torch.nn.functional.mse_loss(m(x), y).item() for m in (model, theirs))
    assert last < 0.05 * first


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_class_equals_the_rule_in_a_functional_loop(line_search_fn):
    model, x, y = _problem(seed=1)
    ours = copy.deepcopy(model)
    hyper = dict(line_search_fn=line_search_fn, history_size=10)
    opt = LBFGSOptimizer(ours.parameters(), **hyper)
    closure = _closure(opt, ours, x, y)
    rule, loss_fn = LBFGS(**hyper), _functional_loss(model, x, y)
    params = _params_of(model)
    state = rule.init(params)
    for step in range(25):  # ~500 L-BFGS iterations: any difference would have grown
        opt.step(closure)
        params, state = _rule_step(rule, state, params, loss_fn, step)
        for k, p in ours.named_parameters():
            torch.testing.assert_close(params[k], p.detach(), rtol=0, atol=0)


def test_complex_parameters_follow_torch_lbfgs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.complex128)
    b = torch.randn(5, generator=g, dtype=torch.complex128)
    z0 = torch.randn(5, generator=g, dtype=torch.complex128)

    def f(z):  # non-convex in z through the quartic
        return (a @ z - b).abs().pow(2).sum() - (z.abs() ** 2).sum() + 0.1 * (z.abs() ** 4).sum()

    ours, theirs = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    hyper = dict(line_search_fn="strong_wolfe", max_iter=2)
    opt, ref = LBFGSOptimizer([ours], **hyper), torch.optim.LBFGS([theirs], **hyper)

    def closure_for(o, z):
        def closure():
            o.zero_grad()
            loss = f(z)
            loss.backward()
            return loss

        return closure

    for _ in range(20):
        opt.step(closure_for(opt, ours))
        ref.step(closure_for(ref, theirs))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_torch_lr_scheduler_drives_the_class_as_it_drives_torch_lbfgs():
    model, x, y = _problem()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    opt, ref = (
        LBFGSOptimizer(ours.parameters(), max_iter=1),
        torch.optim.LBFGS(theirs.parameters(), max_iter=1),
    )
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (opt, ref)]
    for _ in range(20):
        opt.step(_closure(opt, ours, x, y))
        ref.step(_closure(ref, theirs, x, y))
        for s in schedulers:
            s.step()
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.0625
    _assert_models_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_rule_lr_may_be_a_schedule():
    model, x, y = _problem()
    loss_fn = _functional_loss(model, x, y)
    scheduled = LBFGS(lr=O.schedules.StepDecay(1.0, step_size=3, gamma=0.5), max_iter=1)
    params_a = params_b = _params_of(model)
    state_a, state_b = scheduled.init(params_a), scheduled.init(params_b)
    for step in range(9):
        params_a, state_a = _rule_step(scheduled, state_a, params_a, loss_fn, step)
        fixed = LBFGS(lr=0.5 ** (step // 3), max_iter=1)
        params_b, state_b = _rule_step(fixed, state_b, params_b, loss_fn, step)
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k])


# ----------------------------------------------------------------------------- scipy


@pytest.mark.parametrize("n", [2, 6])
def test_rosenbrock_minimum_agrees_with_scipy_lbfgsb(n):
    x0 = np.array([-1.2, 1.0] * (n // 2))
    tight = dict(gtol=1e-12, ftol=1e-15)
    reference = minimize(rosen, x0, jac=rosen_der, method="L-BFGS-B", options=tight)
    assert reference.success

    def loss_fn(params):
        v = params["x"]
        return torch.sum(100.0 * (v[1:] - v[:-1] ** 2) ** 2 + (1.0 - v[:-1]) ** 2)

    rule = LBFGS(
        line_search_fn="strong_wolfe", max_iter=50, tolerance_grad=1e-12, tolerance_change=1e-15
    )
    params = {"x": torch.tensor(x0, dtype=torch.float64)}
    state = rule.init(params)
    for step in range(20):
        params, state = _rule_step(rule, state, params, loss_fn, step)
    ours = params["x"].numpy()
    np.testing.assert_allclose(ours, reference.x, atol=1e-7)
    np.testing.assert_allclose(ours, np.ones(n), atol=1e-7)
    assert loss_fn(params).item() < 1e-12


# ----------------------------------------------------------------------------- strong Wolfe


def test_strong_wolfe_returns_a_step_satisfying_both_conditions():
    # phi(t) = f(x + t d) for f = sum(cosh(x) + 0.5 * x^4) along the steepest descent direction
    x = torch.tensor([2.0, -1.5, 0.7], dtype=torch.float64)

    def f_and_grad(v):
        return (torch.cosh(v) + 0.5 * v**4).sum().item(), torch.sinh(v) + 2 * v**3

    f0, g0 = f_and_grad(x)
    d = -g0
    gtd0 = g0.dot(d).item()
    for t0 in (1e-3, 1.0, 10.0):  # too short (extrapolate), about right, too long (zoom)
        f, g, t, evals = strong_wolfe(lambda t: f_and_grad(x + t * d), t0, d, f0, g0, gtd0)
        assert f <= f0 + 1e-4 * t * gtd0
        assert abs(g.dot(d).item()) <= 0.9 * abs(gtd0)
        assert (f, g.tolist()) == (f_and_grad(x + t * d)[0], f_and_grad(x + t * d)[1].tolist())
        assert 1 <= evals <= 25


def test_strong_wolfe_treats_a_nan_loss_as_too_far():
    x = torch.tensor([1.0], dtype=torch.float64)

    def f_and_grad(v):  # log barrier: NaN beyond x = 2
        value = torch.log(2.0 - v) * -1.0 + v**2
        return value.sum().item(), 1.0 / (2.0 - v) + 2 * v

    f0, g0 = f_and_grad(x)
    d = -g0 * 10  # the first trial lands in the NaN region
    f, _, t, _ = strong_wolfe(lambda t: f_and_grad(x + t * d), 1.0, d, f0, g0, g0.dot(d).item())
    assert np.isfinite(f) and f < f0 and 0 < t < 1


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_state_dict_round_trip_continues_identically(dtype):
    model, x, y = _problem()
    model = model.to(dtype)
    x, y = x.to(dtype), y.to(dtype)
    hyper = dict(line_search_fn="strong_wolfe", history_size=5)
    opt = LBFGSOptimizer(model.parameters(), **hyper)
    for _ in range(5):
        opt.step(_closure(opt, model, x, y))

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = LBFGSOptimizer(resumed_model.parameters(), **hyper)
    resumed.load_state_dict(saved)

    for _ in range(5):
        opt.step(_closure(opt, model, x, y))
        resumed.step(_closure(resumed, resumed_model, x, y))
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_rule_state_is_tensors_only_and_survives_weights_only_loading():
    model, x, y = _problem()
    loss_fn = _functional_loss(model, x, y)
    rule = LBFGS(line_search_fn="strong_wolfe", history_size=4)
    params = _params_of(model)
    state = rule.init(params)
    for step in range(3):
        params, state = _rule_step(rule, state, params, loss_fn, step)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["old_dirs"].shape == (4, sum(p.numel() for p in params.values()))

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    a, _ = _rule_step(rule, state, params, loss_fn, 3)
    b, _ = _rule_step(rule, loaded, params, loss_fn, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_update_does_not_modify_its_inputs():
    model, x, y = _problem()
    loss_fn = _functional_loss(model, x, y)
    rule = LBFGS(line_search_fn="strong_wolfe", history_size=3)
    params = _params_of(model)
    state = rule.init(params)
    for step in range(4):  # fill the history past its size, so it shifts
        params, state = _rule_step(rule, state, params, loss_fn, step)
    grads = torch.func.grad(loss_fn)(params)
    copies = [copy.deepcopy(t) for t in (params, grads, state)]
    rule.update(grads, state, params, step=4, loss_fn=loss_fn)
    for before, after in zip(copies, (params, grads, state)):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.gpu
def test_state_moves_between_devices_and_cuda_matches_cpu():
    model, x, y = _problem()
    rule = LBFGS(line_search_fn="strong_wolfe", history_size=5)
    cpu_params = _params_of(model)
    cpu_state = rule.init(cpu_params)
    for step in range(3):
        cpu_params, cpu_state = _rule_step(
            rule, cpu_state, cpu_params, _functional_loss(model, x, y), step
        )
    cuda_model = copy.deepcopy(model).cuda()
    cuda_loss = _functional_loss(cuda_model, x.cuda(), y.cuda())
    cuda_params = {k: v.cuda() for k, v in cpu_params.items()}
    cuda_state = {k: v.cuda() for k, v in cpu_state.items()}
    for step in range(3, 6):
        cpu_params, cpu_state = _rule_step(
            rule, cpu_state, cpu_params, _functional_loss(model, x, y), step
        )
        cuda_params, cuda_state = _rule_step(rule, cuda_state, cuda_params, cuda_loss, step)
    for k in cpu_params:
        torch.testing.assert_close(cuda_params[k].cpu(), cpu_params[k], rtol=1e-6, atol=1e-8)
    assert all(v.device.type == "cuda" for v in cuda_state.values())


# ----------------------------------------------------------------------------- errors


def test_class_without_a_closure_raises_a_clear_error():
    model, _, _ = _problem()
    opt = LBFGSOptimizer(model.parameters())
    with pytest.raises(RuntimeError, match=r"needs a closure.*step\(closure\)"):
        opt.step()


def test_rule_without_loss_fn_raises_a_clear_error():
    params = {"w": torch.ones(3)}
    rule = LBFGS()
    with pytest.raises(ValueError, match="L-BFGS needs the loss: pass loss_fn"):
        rule.update({"w": torch.ones(3)}, rule.init(params), params, step=0)


def test_class_refuses_a_second_param_group():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="single parameter group"):
        LBFGSOptimizer([{"params": [a]}, {"params": [b]}])
    opt = LBFGSOptimizer([a])
    with pytest.raises(ValueError, match="single parameter group"):
        opt.add_param_group({"params": [b]})


def test_non_finite_loss_raises_instead_of_producing_nan_parameters():
    params = {"w": torch.ones(3, dtype=torch.float64)}
    rule = LBFGS()

    def loss_fn(p):
        return (p["w"] ** 2).sum() * float("nan")

    with pytest.raises(ValueError, match="non-finite loss"):
        rule.update({"w": torch.ones(3)}, rule.init(params), params, step=0, loss_fn=loss_fn)

    def exploding(p):  # a fixed step of lr = 1e3 overflows the exponential
        return torch.exp(p["w"] ** 2).sum()

    rule = LBFGS(lr=1e3)
    grads = torch.func.grad(exploding)(params)
    with pytest.raises(ValueError, match="lower lr or use line_search_fn='strong_wolfe'"):
        rule.update(grads, rule.init(params), params, step=0, loss_fn=exploding)


def test_parameters_that_change_size_raise():
    rule = LBFGS()
    state = rule.init({"w": torch.ones(3)})
    params = {"w": torch.ones(4)}
    with pytest.raises(ValueError, match="state was made for 3 parameter elements"):
        rule.update(params, state, params, step=0, loss_fn=lambda p: p["w"].sum())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr must be >= 0"),
        (dict(lr=float("nan")), "lr must be finite"),
        (dict(max_iter=0), "max_iter must be a positive integer"),
        (dict(max_eval=0), "max_eval must be a positive integer"),
        (dict(history_size=2.5), "history_size must be a positive integer"),
        (dict(tolerance_grad=-1e-7), "tolerance_grad must be >= 0"),
        (dict(tolerance_change=float("inf")), "tolerance_change must be finite"),
        (dict(line_search_fn="armijo"), "line_search_fn must be None or 'strong_wolfe'"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LBFGS(**kwargs)
    with pytest.raises(ValueError, match=message):
        LBFGSOptimizer([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_registered_by_name():
    assert O.get("lbfgs", line_search_fn="strong_wolfe") == LBFGS(line_search_fn="strong_wolfe")
    assert O.get_class("lbfgs") is LBFGSOptimizer
    assert LBFGS().eval_budget == 25 and LBFGS(max_iter=4).eval_budget == 5
