"""BFGS, nonlinear CG, Newton-CG, dense Newton and Levenberg–Marquardt against scipy.optimize;
Hessian-vector products against torch.autograd.functional.hvp and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares, minimize, rosen, rosen_der, rosen_hess_prod

import l2o.optim as O
from l2o.optim.adapter import ClosureLoss
from l2o.optim.base import (
    FunctionalLoss,
    apply_updates,
    finite_difference_hvp,
    hessian_vector_product,
)
from l2o.optim.newton import ResidualLoss, conjugate_gradient

# Closures with backward(create_graph=True) are what exact Hessian-vector products need.
pytestmark = pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")

# --------------------------------------------------------------------------- problems


def rosenbrock(params):
    x = params["x"]
    return torch.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


def _quadratic(n: int = 20, condition: float = 1e4, seed: int = 0):
    """½ xᵀAx - bᵀx with eigenvalues log-spaced over [1, condition] in a random basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = q @ np.diag(np.logspace(0, np.log10(condition), n)) @ q.T
    b = rng.standard_normal(n)
    a_t, b_t = torch.tensor(a), torch.tensor(b)

    def loss(params):
        x = params["x"]
        return 0.5 * x @ a_t @ x - b_t @ x

    def f(x):
        return 0.5 * x @ a @ x - b @ x

    return loss, f, (lambda x: a @ x - b), (lambda x, p: a @ p), np.linalg.solve(a, b)


PROBLEMS = {
    "rosenbrock_2d": (
        rosenbrock,
        rosen,
        rosen_der,
        rosen_hess_prod,
        np.array([-1.2, 1.0]),
        np.ones(2),
    ),
    "rosenbrock_10d": (
        rosenbrock,
        rosen,
        rosen_der,
        rosen_hess_prod,
        np.zeros(10),
        np.ones(10),
    ),
    "ill_conditioned_quadratic": (*_quadratic()[:4], np.zeros(20), _quadratic()[4]),
}

# l2o name -> scipy method; iterations are l2o's (state n_iter or updates) and scipy's nit.
METHODS = {
    "bfgs": "BFGS",
    "cg": "CG",
    "cg_fletcher_reeves": "CG",
    "newton_cg": "Newton-CG",
    "newton": "Newton-CG",
}


def _minimise(rule, loss, x0, *, updates: int = 1000, gtol: float = 1e-5):
    """Run ``rule`` until the gradient's largest entry is below ``gtol`` (scipy's test, with its
    default) or ``updates`` run out; returns the point and the iterations used."""
    params = {"x": torch.tensor(x0, dtype=torch.float64)}
    state = rule.init(params)
    for step in range(updates):
        grads = torch.func.grad(loss)(params)
        if grads["x"].abs().max() < gtol:
            break
        updates_, state = rule.update(grads, state, params, step=step, loss_fn=loss)
        params = apply_updates(params, updates_)
    return params["x"].numpy(), int(state["n_iter"])


def _one_iteration_per_update(name):
    # Line-search rules run max_iter iterations per update (as torch.optim.LBFGS); one per
    # update, with a full search budget, lets the loop stop exactly where scipy's test does.
    # A tiny tolerance_change drops the loss-change stopping tests scipy does not have.
    if name.startswith("newton"):
        return O.get(name)
    return O.get(name, max_iter=1, max_eval=25, tolerance_change=1e-14)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", list(METHODS))
def test_reaches_scipys_minimiser_in_comparable_iterations(name, problem):
    loss, f, jac, hessp, x0, _ = PROBLEMS[problem]
    method = METHODS[name]
    reference = minimize(
        f,
        x0,
        jac=jac,
        hessp=hessp if method == "Newton-CG" else None,
        method=method,
        options={"maxiter": 5000},
    )
    assert reference.success
    x, iterations = _minimise(_one_iteration_per_update(name), loss, x0)
    np.testing.assert_allclose(x, reference.x, atol=1e-4, rtol=0)
    # "Comparable": at most twice scipy's count, plus a few for the restarts of a short run.
    assert iterations <= 2 * reference.nit + 10, (iterations, reference.nit)


def test_polak_ribiere_and_fletcher_reeves_are_different_methods():
    loss, *_ = PROBLEMS["rosenbrock_10d"]
    x0 = np.zeros(10)
    rules = [O.get("cg", max_iter=5), O.get("cg_fletcher_reeves", max_iter=5)]
    points = [_minimise(rule, loss, x0, updates=1)[0] for rule in rules]
    assert not np.allclose(points[0], points[1])


def test_bfgs_inverse_hessian_converges_to_the_quadratics_inverse_hessian():
    loss, *_ = PROBLEMS["ill_conditioned_quadratic"]
    rule = O.get("bfgs", max_iter=100)
    params = {"x": torch.zeros(20, dtype=torch.float64)}
    grads = torch.func.grad(loss)(params)
    _, state = rule.update(grads, rule.init(params), params, step=0, loss_fn=loss)
    hessian = torch.func.hessian(lambda x: loss({"x": x}))(params["x"])
    # Exact line searches on a quadratic make BFGS's H the inverse Hessian after n steps; the
    # Wolfe search is inexact, so H is close, not equal, on the directions visited.
    product = state["H"] @ hessian
    assert torch.linalg.matrix_norm(product - torch.eye(20)) < 1.0


def test_bfgs_refuses_a_problem_beyond_max_size():
    with pytest.raises(ValueError, match=r"dense 11 x 11 inverse Hessian.*use LBFGS"):
        O.get("bfgs", max_size=10).init({"x": torch.zeros(11)})


@pytest.mark.parametrize("name", ["bfgs", "cg", "newton_cg", "newton", "levenberg_marquardt"])
def test_rules_without_loss_fn_raise_a_clear_error(name):
    rule = O.get(name)
    params = {"x": torch.ones(3)}
    with pytest.raises(ValueError, match="needs the loss: pass loss_fn"):
        rule.update({"x": torch.ones(3)}, rule.init(params), params, step=0)


@pytest.mark.parametrize("name", ["bfgs", "cg", "newton_cg", "newton"])
def test_torch_optim_class_follows_the_rule(name):
    """The class with a closure takes the same steps as the rule on a small network."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))

    def functional(params):
        out = torch.func.functional_call(model, params, (x,))
        return torch.nn.functional.mse_loss(out, y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    rule = O.get(name)
    state = rule.init(params)
    opt = O.get_class(name)(model.parameters())

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward(create_graph=name.startswith("newton"))
        return loss

    first = float(functional(params))
    for step in range(3):
        grads = torch.func.grad(functional)(params)
        updates, state = rule.update(grads, state, params, step=step, loss_fn=functional)
        params = apply_updates(params, updates)
        opt.step(closure)
    for (k, p), q in zip(params.items(), model.parameters()):
        torch.testing.assert_close(q.detach(), p, rtol=1e-7, atol=1e-9, msg=k)
    assert float(functional(params)) < first


def test_newton_cg_from_a_plain_closure_uses_finite_differences_and_still_converges():
    loss, *_ = PROBLEMS["rosenbrock_2d"]
    p = torch.nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))
    opt = O.Newton([p])

    def closure():
        opt.zero_grad()
        value = loss({"x": p})
        value.backward()
        return value

    for _ in range(60):
        opt.step(closure)
    torch.testing.assert_close(p.detach(), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_newton_damping_rises_after_a_bad_step_and_falls_after_good_ones():
    loss, *_ = PROBLEMS["rosenbrock_2d"]
    rule = O.get("newton_cg", damping=1e-8, lr=50.0)  # a 50x Newton step: the model fails
    params = {"x": torch.tensor([-1.2, 1.0], dtype=torch.float64)}
    grads = torch.func.grad(loss)(params)
    updates, state = rule.update(grads, rule.init(params), params, step=0, loss_fn=loss)
    assert float(state["damping"]) > 1e-8 and int(state["rejected"]) == 1
    assert torch.equal(updates["x"], torch.zeros(2, dtype=torch.float64))
    rule = O.get("newton_cg", damping=1.0)
    quadratic, *_ = PROBLEMS["ill_conditioned_quadratic"]
    params = {"x": torch.zeros(20, dtype=torch.float64)}
    state = rule.init(params)
    for step in range(3):
        grads = torch.func.grad(quadratic)(params)
        updates, state = rule.update(grads, state, params, step=step, loss_fn=quadratic)
        params = apply_updates(params, updates)
    assert float(state["damping"]) == pytest.approx((2 / 3) ** 3)


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = m @ m.T + 8 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x, ax = conjugate_gradient(lambda v: a @ v, b, 50, 1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))
    torch.testing.assert_close(ax, a @ x)


# --------------------------------------------------------------------------- HVPs


def _net_loss():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)

    def loss(params):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    vector = {k: torch.randn_like(v) for k, v in params.items()}
    return model, x, y, loss, params, vector


def test_hvp_equals_torch_autograd_functional_hvp_and_finite_differences():
    _, _, _, loss, params, vector = _net_loss()
    keys = list(params)

    def positional(*tensors):
        return loss(dict(zip(keys, tensors)))

    _, reference = torch.autograd.functional.hvp(
        positional, tuple(params.values()), tuple(vector.values())
    )
    exact = hessian_vector_product(FunctionalLoss(loss), params, vector)
    differenced = finite_difference_hvp(FunctionalLoss(loss), params, vector)
    for k, ref in zip(keys, reference):
        torch.testing.assert_close(exact[k], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(differenced[k], ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("create_graph", [True, False])
def test_closure_hvp_is_exact_with_create_graph_and_close_without(create_graph):
    model, x, y, loss, params, vector = _net_loss()
    reference = hessian_vector_product(FunctionalLoss(loss), params, vector)
    live = dict(model.named_parameters())
    calls = []

    def closure():
        calls.append(1)
        for p in live.values():
            p.grad = None
        value = torch.nn.functional.mse_loss(model(x), y)
        value.backward(create_graph=create_graph)
        return value

    product = ClosureLoss(closure, live).hvp(params, vector)
    tolerance = dict(rtol=1e-10, atol=1e-12) if create_graph else dict(rtol=1e-6, atol=1e-8)
    for k in params:
        torch.testing.assert_close(product[k], reference[k], **tolerance)
    assert len(calls) == (1 if create_graph else 3)


def test_hvp_runs_under_vmap():
    _, _, _, loss, params, _ = _net_loss()
    basis = {k: torch.randn(3, *v.shape, dtype=v.dtype) for k, v in params.items()}
    batched = torch.func.vmap(lambda v: FunctionalLoss(loss).hvp(params, v))(basis)
    for i in range(3):
        one = FunctionalLoss(loss).hvp(params, {k: v[i] for k, v in basis.items()})
        for k in params:
            torch.testing.assert_close(batched[k][i], one[k])


# --------------------------------------------------------------------------- least squares


def _curve_fit_data():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 4, 40)
    y = 2.5 * np.exp(-1.3 * t) + 0.5 + 0.02 * rng.standard_normal(40)
    return t, y


def _scipy_fit(x0):
    t, y = _curve_fit_data()
    return least_squares(
        lambda p: p[0] * np.exp(-p[1] * t) + p[2] - y, x0, method="lm", xtol=1e-14, ftol=1e-14
    )


def _residual_fn():
    t, y = (torch.tensor(a) for a in _curve_fit_data())

    def residuals(params):
        a, b, c = params["theta"]
        return a * torch.exp(-b * t) + c - y

    return residuals


@pytest.mark.parametrize("name", ["levenberg_marquardt", "gauss_newton"])
def test_levenberg_marquardt_matches_scipy_least_squares_lm(name):
    x0 = np.array([1.0, 0.5, 0.0])
    reference = _scipy_fit(x0)
    assert reference.success
    loss_fn = ResidualLoss(_residual_fn())
    rule = O.get(name)
    params = {"theta": torch.tensor(x0)}
    state = rule.init(params)
    for step in range(50):
        grads = torch.func.grad(loss_fn)(params)
        updates, state = rule.update(grads, state, params, step=step, loss_fn=loss_fn)
        params = apply_updates(params, updates)
    np.testing.assert_allclose(params["theta"].numpy(), reference.x, rtol=1e-8)
    assert float(loss_fn(params)) == pytest.approx(reference.cost, rel=1e-10)


def test_levenberg_marquardt_class_takes_a_residual_closure():
    x0 = np.array([1.0, 0.5, 0.0])
    reference = _scipy_fit(x0)
    residuals = _residual_fn()
    theta = torch.nn.Parameter(torch.tensor(x0))
    opt = O.LevenbergMarquardt([theta])
    for _ in range(50):
        loss = opt.step(lambda: residuals({"theta": theta}))
    np.testing.assert_allclose(theta.detach().numpy(), reference.x, rtol=1e-8)
    assert float(loss.detach()) == pytest.approx(reference.cost, rel=1e-6)


def test_levenberg_marquardt_without_residuals_says_what_it_needs():
    rule = O.get("levenberg_marquardt")
    params = {"theta": torch.ones(3)}
    with pytest.raises(TypeError, match="ResidualLoss"):
        rule.update(
            {"theta": torch.ones(3)},
            rule.init(params),
            params,
            step=0,
            loss_fn=lambda p: p["theta"].sum(),
        )
    opt = O.LevenbergMarquardt([torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(TypeError, match="residuals as a floating-point tensor"):
        opt.step(lambda: 3)


def test_line_search_pieces_survive_degenerate_inputs():
    """A search that returned t = 0 (all evaluations spent on worse points) must not make the
    next CG iteration start from a zero step, nor the cubic fit divide by zero."""
    from l2o.optim.line_search import Progress, _cubic_minimizer, _Trial
    from l2o.optim.quasi_newton import _Conjugate

    point = _Trial(0.5, 1.0, torch.zeros(2), -1.0)
    assert _cubic_minimizer(point, point, 1.0, 3.0) == 2.0
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    stalled = Progress(g, 0.0, g, 1.0, -5.0, n_iter=3, func_evals=9)
    step = _Conjugate("polak_ribiere", 10, 1, 1.0, True).first_step(4, g, -5.0, stalled)
    assert step == pytest.approx(1.0 / 3.0)  # min(1, 1/|g|_1), the restart's first step
