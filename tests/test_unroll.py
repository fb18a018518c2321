"""The vmapped truncated unroll (l2o.meta.unroll) and the meta-losses (l2o.meta.losses)."""

import math

import pytest
import torch
from _meta_fixtures import MomentumLOpt, MomentumRule, Quadratic
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_map_only

from l2o.meta.losses import META_LOSSES, MetaLossTerms, get_meta_loss
from l2o.meta.unroll import count_nonfinite, detach_carry, init_carry, unroll
from l2o.optim.base import apply_updates
from l2o.optim.muon import Muon
from l2o.optim.rules import SGD
from l2o.optim.schedules import Cosine, run_annealing
from l2o.optim.wrappers import SAM


def _rule(lr=0.1, beta=0.6, decay=0.5):
    return MomentumRule(
        torch.tensor(math.log(lr), dtype=torch.float64),
        torch.tensor(math.log(beta / (1 - beta)), dtype=torch.float64),
        decay,
    )


def _member(tree, i):
    return tree_map_only(torch.Tensor, lambda t: t[i], tree)


def _loop_reference(rule, task, carry, num_steps, factor=lambda step: 1.0):
    """Member by member in plain Python with torch.autograd: the reference for ``unroll``
    (``factor(step)`` multiplies the update of inner step ``step``)."""
    members = []
    for i, (seed, first) in enumerate(zip(carry["seeds"].tolist(), carry["step"].tolist())):
        params, state = _member(carry["params"], i), _member(carry["opt_state"], i)
        losses = []
        for k in range(num_steps):
            leaves = {n: v.detach().requires_grad_() for n, v in params.items()}
            loss = task.loss(leaves, task.batch(seed, first + k))
            grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
            updates, state = rule.update(grads, state, params, step=first + k)
            updates = {n: u * factor(first + k) for n, u in updates.items()}
            params = apply_updates(params, updates)
            losses.append(loss.detach())
        final = task.loss(params, task.batch(seed, first + num_steps))
        members.append((params, state, torch.stack(losses), final))
    return members


def _staggered_carry(rule, task, seeds=(11, 12, 13), steps=(0, 3, 1)):
    carry = init_carry(rule, task, torch.tensor(seeds))
    # Members at different inner steps: the rule sees each member's own step.
    return dict(carry, step=torch.tensor(steps))


def test_vmapped_unroll_matches_a_python_loop_over_instances():
    task, rule = Quadratic(dim=3, noise=0.3), _rule()
    carry = _staggered_carry(rule, task)
    out = unroll(rule, task, carry, 4)
    reference = _loop_reference(rule, task, carry, 4)
    assert out.losses.shape == (4, 3) and out.terms.train.shape == (4, 3)
    for i, (params, state, losses, final) in enumerate(reference):
        torch.testing.assert_close(_member(out.carry["params"], i), params)
        torch.testing.assert_close(_member(out.carry["opt_state"], i), state)
        torch.testing.assert_close(out.losses[:, i], losses)
        # Meta-loss terms are the losses *after* each update: the next step's loss, then final.
        torch.testing.assert_close(out.terms.train[:, i], torch.cat([losses[1:], final[None]]))
    assert out.carry["step"].tolist() == [4, 7, 5]
    assert torch.equal(out.carry["seeds"], carry["seeds"])
    # The initial loss is the loss at the episode's first parameters, on its first batch.
    assert torch.equal(out.terms.initial, carry["initial_loss"])
    assert out.terms.initial[0] == out.losses[0, 0]


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_an_update_schedule_scales_every_members_updates_at_its_own_step(name):
    rule, task = _rule(), Quadratic(noise=0.3)
    carry = _staggered_carry(rule, task)
    schedule = run_annealing(name, 6)
    out = unroll(rule, task, carry, 4, update_schedule=schedule)
    for i, (params, state, losses, final) in enumerate(
        _loop_reference(rule, task, carry, 4, factor=schedule)
    ):
        torch.testing.assert_close(_member(out.carry["params"], i), params)
        torch.testing.assert_close(_member(out.carry["opt_state"], i), state)  # not scaled
        torch.testing.assert_close(out.losses[:, i], losses)
        torch.testing.assert_close(out.terms.train[-1, i], final)
    constant = unroll(rule, task, carry, 4)
    assert not torch.allclose(constant.carry["params"]["w"], out.carry["params"]["w"])


def test_run_annealing_names_and_errors():
    assert run_annealing("constant", 10) is None
    assert run_annealing("cosine", 10) == Cosine(lr=1.0, total_steps=10)
    assert run_annealing("linear", 4)(torch.tensor([0, 2, 4])).tolist() == [1.0, 0.5, 0.0]
    wsd = run_annealing("wsd", 10)(torch.arange(12)).tolist()
    assert wsd == [1.0] * 9 + [0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="update_schedule must be one of"):
        run_annealing("exponential", 10)


def test_consecutive_truncations_equal_one_long_unroll():
    task, rule = Quadratic(noise=0.2), _rule()
    carry = init_carry(rule, task, torch.tensor([5, 6]))
    long = unroll(rule, task, carry, 7)
    first = unroll(rule, task, carry, 3)
    second = unroll(rule, task, first.carry, 4)
    torch.testing.assert_close(torch.cat([first.losses, second.losses]), long.losses)
    torch.testing.assert_close(second.carry["params"], long.carry["params"])
    torch.testing.assert_close(second.terms.initial, long.terms.initial)


def test_per_member_meta_params_match_separate_shared_rule_unrolls():
    lopt, task = MomentumLOpt(decay=0.3), Quadratic(noise=0.2)
    metas = [
        {"log_lr": torch.tensor(v), "logit_beta": torch.tensor(b)}
        for v, b in [(-2.0, 0.0), (-1.0, 1.0), (-3.0, -1.0)]
    ]
    metas = [{k: v.double() for k, v in m.items()} for m in metas]
    stacked = {k: torch.stack([m[k] for m in metas]) for k in metas[0]}
    seeds = torch.tensor([1, 2, 3])
    carry = init_carry(lopt.rule, task, seeds, population_meta_params=stacked)
    with torch.no_grad():  # the ES / PES setting: no autograd through the unroll
        out = unroll(lopt.rule, task, carry, 5, population_meta_params=stacked)
    for i, meta in enumerate(metas):
        rule = lopt.rule(meta)
        alone = unroll(rule, task, init_carry(rule, task, seeds[i : i + 1]), 5)
        torch.testing.assert_close(out.losses[:, i], alone.losses[:, 0].detach())
        torch.testing.assert_close(
            _member(out.carry["params"], i), _member(alone.carry["params"], 0)
        )


def _meta_gradient(checkpoint):
    lopt, task = MomentumLOpt(decay=0.2), Quadratic(dim=3, noise=0.2)
    meta = {k: v.requires_grad_() for k, v in lopt.init_meta(torch.Generator()).items()}
    rule = lopt.rule(meta)
    carry = init_carry(rule, task, torch.tensor([1, 2]))
    out = unroll(rule, task, carry, 6, checkpoint=checkpoint, eval_mode="each")
    objective = out.terms.train.mean() + out.terms.eval.mean()
    return torch.autograd.grad(objective, list(meta.values())), out


def test_checkpointing_inner_steps_leaves_losses_and_meta_gradient_unchanged():
    plain, plain_out = _meta_gradient(checkpoint=False)
    checked, checked_out = _meta_gradient(checkpoint=True)
    torch.testing.assert_close(checked, plain)
    torch.testing.assert_close(checked_out.losses, plain_out.losses)
    assert all(g.abs().sum() > 0 for g in plain)


class _EvalSetQuadratic(Quadratic):
    """Overrides eval_loss (as a task with a full held-out set would): mean over 3 eval batches."""

    def eval_loss(self, params, seed, step=0):
        batches = [self.batch(seed, step + j, "eval") for j in range(3)]
        return torch.stack([self.loss(params, b) for b in batches]).mean()


@pytest.mark.parametrize("task_cls", [Quadratic, _EvalSetQuadratic])
def test_held_out_losses_are_the_tasks_eval_losses_after_each_update(task_cls):
    task, rule = task_cls(noise=0.5), _rule()
    carry = init_carry(rule, task, torch.tensor([3, 4]))
    each = unroll(rule, task, carry, 3, eval_mode="each")
    final = unroll(rule, task, carry, 3, eval_mode="final")
    assert each.terms.eval.shape == (3, 2) and final.terms.eval.shape == (1, 2)
    assert unroll(rule, task, carry, 3).terms.eval is None
    params = final.carry["params"]
    expected = torch.stack([task.eval_loss(_member(params, i), s, 3) for i, s in enumerate([3, 4])])
    torch.testing.assert_close(final.terms.eval[0], expected)
    torch.testing.assert_close(each.terms.eval[-1], expected)
    # Held-out data differs from training data.
    assert not torch.allclose(each.terms.eval[-1], each.terms.train[-1])


def test_nonfinite_inner_losses_are_counted():
    task, rule = Quadratic(noise=0.0), _rule(lr=1e30, decay=0.0)
    carry = init_carry(rule, task, torch.tensor([1, 2]))
    out = unroll(rule, task, carry, 20)
    assert count_nonfinite(out) > 0
    assert count_nonfinite(unroll(_rule(), task, carry, 5)) == 0


def test_unroll_rejects_bad_arguments():
    task, rule = Quadratic(), _rule()
    carry = init_carry(rule, task, torch.tensor([1]))
    with pytest.raises(ValueError, match="num_steps"):
        unroll(rule, task, carry, 0)
    with pytest.raises(ValueError, match="eval_mode"):
        unroll(rule, task, carry, 1, eval_mode="sometimes")
    with pytest.raises(TypeError, match="UpdateRule"):
        unroll(MomentumLOpt().rule, task, carry, 1)


# -- meta-losses ---------------------------------------------------------------------------


def _terms():
    train = torch.tensor([[4.0, 1.0], [2.0, 8.0], [1.0, 0.5]], dtype=torch.float64)
    initial = torch.tensor([4.0, 2.0], dtype=torch.float64)
    held_out = torch.tensor([[5.0, 2.0], [3.0, 9.0], [2.0, 1.5]], dtype=torch.float64)
    return MetaLossTerms(train, initial, held_out)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train_mean", [7.0 / 3, 9.5 / 3]),
        ("eval", [10.0 / 3, 12.5 / 3]),
        ("eval_final", [2.0, 1.5]),
        ("log", [math.log(8.0) / 3, math.log(4.0) / 3]),
        ("normalized", [7.0 / 12, 9.5 / 6]),
        ("clipped", [(1.0 + 0.5 + 0.25) / 3, (0.5 + 1.0 + 0.25) / 3]),
    ],
)
def test_meta_losses_follow_their_formulas(name, expected):
    value = get_meta_loss(name)(_terms())
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))


def test_meta_loss_registry_names_and_errors():
    assert set(META_LOSSES) == {"train_mean", "eval", "eval_final", "log", "normalized", "clipped"}
    assert get_meta_loss("eval").eval_mode == "each"
    assert get_meta_loss("eval_final").eval_mode == "final"
    assert get_meta_loss("train_mean").eval_mode == "none"
    with pytest.raises(ValueError, match=r"unknown meta-loss 'nope'.*train_mean"):
        get_meta_loss("nope")
    with pytest.raises(ValueError, match="held-out"):
        get_meta_loss("eval")(_terms()._replace(eval=None))


def test_clipped_meta_loss_ignores_a_diverging_member_beyond_its_initial_loss():
    terms = _terms()._replace(
        train=torch.tensor([[1e30], [float("inf")]], dtype=torch.float64),
        initial=torch.tensor([2.0], dtype=torch.float64),
    )
    assert get_meta_loss("clipped")(terms).item() == 1.0


# -- compiled inner steps (the ES/PES forward path) ----------------------------------------------


def _per_member_setup(lopt, task, population=4):
    g = torch.Generator().manual_seed(0)
    base = lopt.init_meta(g)
    stacked = {
        k: torch.stack([v + 0.01 * torch.randn(v.shape, generator=g) for _ in range(population)])
        for k, v in base.items()
    }
    seeds = torch.arange(population, dtype=torch.int64)
    return stacked, init_carry(lopt.rule, task, seeds, population_meta_params=stacked)


def _assert_compiled_unroll_matches_eager(lopt, task, steps, rtol, schedule=None, eval_mode="none"):
    stacked, carry = _per_member_setup(lopt, task)
    kw = dict(population_meta_params=stacked, update_schedule=schedule, eval_mode=eval_mode)
    with torch.no_grad():
        eager = unroll(lopt.rule, task, carry, steps, **kw)
        compiled = unroll(lopt.rule, task, carry, steps, compile=True, **kw)
        # A second, shorter truncation from the compiled one's carry (an episode's last one;
        # with a schedule, over another episode length: the factor is an input of the graph,
        # not a constant in it).
        if schedule is not None:
            kw["update_schedule"] = Cosine(lr=1.0, total_steps=schedule.total_steps + 7)
        # ... with the same graph: its length is a dynamic dimension.
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = unroll(lopt.rule, task, compiled.carry, steps - 1, compile=True, **kw)
        reference = unroll(lopt.rule, task, eager.carry, steps - 1, **kw)
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(compiled.terms, eager.terms, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(again.losses, reference.losses, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(again.terms, reference.terms, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(again.carry, reference.carry, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("schedule", [None, Cosine(lr=1.0, total_steps=9)])
def test_compiled_truncations_equal_the_eager_unroll(schedule):
    """One compiled scan per truncation, of any length (the shorter second one)."""
    _assert_compiled_unroll_matches_eager(
        MomentumLOpt(decay=0.3), Quadratic(noise=0.2), 4, 1e-6, schedule
    )


@pytest.mark.parametrize("eval_mode", ["final", "each"])
def test_compiled_truncations_with_held_out_losses_equal_the_eager_unroll(eval_mode):
    """``final``: the scan, then one held-out evaluation; ``each``: compiled steps, each
    followed by its held-out evaluation."""
    _assert_compiled_unroll_matches_eager(
        MomentumLOpt(decay=0.3), Quadratic(noise=0.2), 3, 1e-6, eval_mode=eval_mode
    )


def _compiled_unroll_on(dim: int, path: str):
    """A 2-step compiled unroll on a ``dim``-dimensional quadratic: the ES/PES scan, the
    ES/PES per-step graphs (``eval_mode="each"``) or TBPTT's per-step graphs."""
    lopt, task = MomentumLOpt(decay=0.3), Quadratic(dim=dim, noise=0.2)
    if path == "tbptt":
        meta = {k: v.requires_grad_() for k, v in lopt.init_meta(torch.Generator()).items()}
        rule = lopt.rule(meta)
        return unroll(rule, task, init_carry(rule, task, torch.arange(2)), 2, compile=True)
    stacked, carry = _per_member_setup(lopt, task)
    eval_mode = "each" if path == "per step" else "none"
    with torch.no_grad():
        return unroll(
            lopt.rule,
            task,
            carry,
            2,
            compile=True,
            population_meta_params=stacked,
            eval_mode=eval_mode,
        )


@pytest.mark.parametrize("path", ["scan", "per step", "tbptt"])
def test_compiled_unrolls_hold_one_graph_per_structure_up_to_a_stated_limit(monkeypatch, path):
    """Past Dynamo's global recompile limit (here 1) as many structures as the module allows
    (here 2) compile; one more is refused with a message that says what to change (rather
    than a failure, or a silent fall-back to the eager path)."""
    import l2o.meta.unroll as unroll_module

    monkeypatch.setattr(unroll_module, "MAX_COMPILED_STRUCTURES", 2)
    torch._dynamo.reset()  # other tests' graphs would count against the limit
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            for dim in (2, 3):  # two structures: past the global limit, within the module's
                _compiled_unroll_on(dim, path)
            with pytest.raises(ValueError, match=r"estimator\.compile=false"):
                _compiled_unroll_on(4, path)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_inner_steps_of_the_mlp_learned_optimizer_equal_the_eager_unroll():
    from l2o.learned import MLPLOpt
    from l2o.tasks.registry import get_task

    task = get_task("mlp", dataset="digits", width=16, depth=2, batch_size=16)
    _assert_compiled_unroll_matches_eager(MLPLOpt(), task, 5, 1e-5)


@pytest.mark.slow
def test_compiled_truncations_of_the_ortho_mlp_learned_optimizer_equal_the_eager_unroll():
    """The default recipe's compiled PES truncation: Newton–Schulz, the AdamW vector rule, and
    (inside the compiled graph) the feature-major form of every tensor's MLP, against the eager
    unroll's reference form."""
    from l2o.learned import get_lopt
    from l2o.tasks.registry import get_task

    lopt = get_lopt("ortho_mlp", vector_rule="adamw", vector_hparams={"lr": 1e-2})
    task = get_task("mlp", dataset="digits", width=16, depth=2, batch_size=16)
    _assert_compiled_unroll_matches_eager(lopt, task, 5, 1e-4)


def test_compile_is_refused_with_checkpointing_and_for_per_member_rules_under_autograd():
    lopt, task = MomentumLOpt(decay=0.3), Quadratic()
    stacked, carry = _per_member_setup(lopt, task)
    rule = _rule()
    shared_carry = init_carry(rule, task, torch.tensor([1]))
    with pytest.raises(ValueError, match="not with checkpoint=True"):
        unroll(rule, task, shared_carry, 1, compile=True, checkpoint=True)
    with pytest.raises(ValueError, match=r"\(ES/PES\) runs under torch.no_grad"):
        unroll(lopt.rule, task, carry, 1, population_meta_params=stacked, compile=True)


def test_a_compiled_shared_rule_without_meta_gradient_records_no_graph():
    """A shared rule compiled where no meta-gradient is taken (under ``no_grad``, or a rule
    whose tensors do not require grad in grad mode): the eager results, nothing that requires
    grad, as the eager unroll."""
    lopt, task = MomentumLOpt(decay=0.3), Quadratic(noise=0.2)
    rule = lopt.rule(lopt.init_meta(torch.Generator()))
    carry = init_carry(rule, task, torch.arange(2))
    eager = unroll(rule, task, carry, 3)
    for context in (torch.no_grad(), torch.enable_grad()):
        with context:
            compiled = unroll(rule, task, carry, 3, compile=True)
        assert not compiled.losses.requires_grad
        assert not any(t.requires_grad for t in compiled.carry["params"].values())
        torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(compiled.carry, eager.carry, rtol=1e-6, atol=1e-7)


# -- compiled inner steps under autograd (TBPTT) -------------------------------------------------


def _tbptt(lopt, task, meta, carry, steps, compile, **kw):
    """Losses, meta-gradients and the (detached) carry of one TBPTT truncation."""
    meta = {k: v.detach().requires_grad_() for k, v in meta.items()}
    result = unroll(lopt.rule(meta), task, carry, steps, compile=compile, **kw)
    objective = get_meta_loss("log")(result.terms).mean()
    found = torch.autograd.grad(objective, list(meta.values()), allow_unused=True)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(meta.values(), found)]
    return result.losses.detach(), grads, detach_carry(result.carry)


def _assert_compiled_tbptt_matches_eager(lopt, task, steps, rtol, **kw):
    g = torch.Generator().manual_seed(0)
    meta = lopt.init_meta(g)
    carry = init_carry(lopt.rule(meta), task, torch.arange(3, dtype=torch.int64))
    eager = _tbptt(lopt, task, meta, carry, steps, False, **kw)
    torch._dynamo.reset()
    counters.clear()
    compiled = _tbptt(lopt, task, meta, carry, steps, True, **kw)
    # One graph for every step: the first steps' carry, which does not depend on the
    # meta-parameters yet, is not a reason to compile again.
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(compiled, eager, rtol=rtol, atol=1e-7)
    # The next truncation, at other meta-parameters (a new rule object) and from a carry that
    # has left its initial layout, runs the same graph.
    moved = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in meta.items()}
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _tbptt(lopt, task, moved, compiled[2], steps, True, **kw)
    reference = _tbptt(lopt, task, moved, eager[2], steps, False, **kw)
    torch.testing.assert_close(again, reference, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize(
    "kw", [{}, {"update_schedule": Cosine(lr=1.0, total_steps=9), "eval_mode": "each"}]
)
def test_compiled_tbptt_steps_give_the_eager_losses_and_meta_gradients(kw):
    """Each step a compiled graph with its compiled backward: the same inner losses,
    meta-gradients and carry as the eager oracle, over two truncations with one graph."""
    lopt, task = MomentumLOpt(decay=0.3), Quadratic(noise=0.2)
    _assert_compiled_tbptt_matches_eager(lopt, task, 3, 1e-5, **kw)


class _LearningRateLOpt:
    """A hand-designed rule whose learning rate is the meta-parameter (a hypergradient, as
    TBPTT over ``lr`` computes it): ``build(lr)`` is the rule."""

    def __init__(self, build):
        self.build = build

    def init_meta(self, generator):
        return {"log_lr": torch.tensor(math.log(0.1), dtype=torch.float64)}

    def rule(self, meta):
        return self.build(meta["log_lr"].exp())


@pytest.mark.parametrize(
    "build",
    [
        # needs_loss_fn: the step's loss closure differentiated again inside the compiled step
        lambda lr: SAM(base=SGD(lr=lr, momentum=0.5), rho=0.1),
        # the meta-parameter only in a nested rule's field (Muon's ``other``), not Muon's own
        lambda lr: Muon(lr=0.02, other=SGD(lr=lr, momentum=0.5), matrix_keys=()),
    ],
    ids=["sam", "nested_rule"],
)
def test_compiled_tbptt_steps_of_hand_designed_rules_give_the_eager_hypergradients(build):
    _assert_compiled_tbptt_matches_eager(_LearningRateLOpt(build), Quadratic(noise=0.2), 3, 1e-6)


@pytest.mark.slow
def test_compiled_tbptt_steps_of_the_mlp_learned_optimizer_give_the_eager_meta_gradients():
    from l2o.learned import MLPLOpt
    from l2o.tasks.registry import get_task

    task = get_task("mlp", dataset="digits", width=16, depth=2, batch_size=16)
    _assert_compiled_tbptt_matches_eager(MLPLOpt(), task, 4, 1e-4)


@pytest.mark.slow
def test_compiled_tbptt_steps_of_the_ortho_mlp_learned_optimizer_give_the_eager_meta_gradients():
    """The shipped architecture: Newton–Schulz and the AdamW vector rule inside the compiled
    step and its backward."""
    from l2o.learned import get_lopt
    from l2o.tasks.registry import get_task

    lopt = get_lopt("ortho_mlp", vector_rule="adamw", vector_hparams={"lr": 1e-2})
    task = get_task("mlp", dataset="digits", width=16, depth=2, batch_size=16)
    _assert_compiled_tbptt_matches_eager(lopt, task, 4, 1e-4)


@pytest.mark.parametrize(
    ("widest", "options"), [(512, {"cpp.simdlen": 256}), (256, {}), (128, {}), (None, {})]
)
def test_compiled_graphs_ask_for_256_bit_vectors_only_on_512_bit_cpus(monkeypatch, widest, options):
    """The narrow per-coordinate MLPs run as masked partial vectors at 512 bits; a width the
    CPU lacks would turn vectorisation off, and a failed probe (None) keeps the defaults."""
    from torch._inductor import cpu_vec_isa

    from l2o.meta import unroll as unroll_module

    class Isa:
        def bit_width(self) -> int:
            if widest is None:
                raise RuntimeError("no C++ compiler")
            return widest

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", Isa)
    unroll_module._cpu_codegen_options.cache_clear()
    try:
        assert unroll_module._cpu_codegen_options() == options
        unroll_module._cpu_codegen_options.cache_clear()
        # A width the user chose is theirs: no option overrides it.
        with torch._inductor.config.patch({"cpp.simdlen": 512}):
            assert unroll_module._cpu_codegen_options() == {}
    finally:
        unroll_module._cpu_codegen_options.cache_clear()
