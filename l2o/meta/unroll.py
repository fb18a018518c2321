"""Truncated unrolls: inner training of a population of task instances under an update rule.

A population is ``P`` instances of one task structure, stacked along a leading dim and trained
side by side with ``torch.func.vmap``. Their inner-training state is the *carry*, a dict of
tensors::

    params        {name: [P, ...]}   the instances' parameters
    opt_state     the rule's state, every tensor stacked along dim 0
    step          [P] int64          inner step within the episode (the next update's index)
    seeds         [P] int64          instance seeds: initial parameters and data order
    initial_loss  [P]                training loss at the episode's initial parameters

One inner step of member ``i`` (all members at once, under vmap)::

    g_i, l_i       = grad_and_value(task.loss)(params_i, batch(seed_i, step_i))
    u_i, state_i   = rule.update(g_i, state_i, params_i, step=step_i)
    params_i      += u_i

``unroll`` runs ``K`` such steps and returns the new carry, the ``[K, P]`` inner losses and the
meta-loss terms (:class:`l2o.meta.losses.MetaLossTerms`). It is pure: autograd flows from the
meta-loss back through every step to the meta-parameters the rule closes over (truncated BPTT),
or it runs under ``torch.no_grad`` (ES, PES). Episode boundaries (resets) are the estimator's
business: an unroll never crosses one.

Either one rule is shared by the whole population, or (ES, PES) each member has its own
meta-parameters: pass ``rule`` as a function ``meta_params -> UpdateRule`` (``lopt.rule``) and
``population_meta_params`` stacked along dim 0.

``compile=True`` runs the inner steps compiled: the vmapped gradient, the vmapped rule update
and the parameter update fused by Inductor, instead of hundreds of small eager ops whose Python
and dispatch overhead dominates for small inner networks. On the forward (ES, PES) path the
whole truncation is one graph, a ``scan`` over its ``K`` steps
(``torch._higher_order_ops.scan``, the counterpart of JAX's ``lax.scan``): the step's body is
compiled once and looped inside the graph, the minibatches gathered up front; on the CPU the
graph's wrapper is C++, so no Python runs between inner steps (on CUDA Inductor's Python
wrapper drives the loop). Its length is a dynamic dimension, so an episode's shorter last
truncation reuses the graph. With ``eval_mode="each"`` (a held-out evaluation after every
step, outside the graph) each step is a compiled graph of its own instead. Under autograd
(TBPTT, a shared rule) each step is a compiled graph too, whose backward AOTAutograd compiles
as well: the scan under autograd, the inner gradient differentiated again, did not finish
compiling (BENCHMARKS.md). The eager path is the oracle all of them are tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor
from torch._higher_order_ops.scan import scan
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from l2o.compiling import compile_quietly
from l2o.meta.losses import EVAL_MODES, MetaLossTerms
from l2o.optim.base import FunctionalLoss, Params, State, UpdateRule, apply_updates
from l2o.tasks.base import Batch, Task, members_batch


class Carry(TypedDict):
    """The population's inner-training state (a plain dict at run time; see the module
    docstring). Every tensor has the population as its leading dim."""

    params: Params
    opt_state: State
    step: Tensor
    seeds: Tensor
    initial_loss: Tensor


RuleOrFactory = UpdateRule | Callable[[Params], UpdateRule]


class Unroll(NamedTuple):
    """What ``unroll`` returns."""

    carry: Carry
    #: ``[K, P]`` training losses at the parameters each update's gradient was taken at.
    losses: Tensor
    terms: MetaLossTerms


# Rules that draw noise (Entropy-SGD's Langevin steps, LPF-SGD's perturbations) draw it
# independently for every member of the population.
RULE_RANDOMNESS = "different"


def detach_carry(carry: Carry) -> Carry:
    """The carry cut from the autograd graph (between truncations)."""
    return tree_map_only(Tensor, Tensor.detach, carry)


def finite_losses(result: Unroll) -> Tensor:
    """``[K + 1, P]``: which inner losses of a truncation (including the final evaluation) are
    finite."""
    return torch.isfinite(torch.cat([result.losses, result.terms.train[-1:]]).detach())


def count_nonfinite(result: Unroll) -> int:
    """Inner losses of a truncation that are NaN or infinite (including the final evaluation)."""
    return int((~finite_losses(result)).sum())


def init_carry(
    rule: RuleOrFactory,
    task: Task,
    seeds: Tensor,
    *,
    population_meta_params: Params | None = None,
    device: torch.device | str | None = None,
) -> Carry:
    """Fresh episodes for instances ``seeds`` ([P] int64): initial parameters, rule state, step
    0, and the initial training loss (on the first step's batch) that normalized meta-losses
    divide by."""
    device = torch.device(device) if device is not None else task.device
    seed_list = [int(s) for s in seeds.tolist()]
    params = {k: v.to(device) for k, v in task.population_init(seed_list).items()}
    if population_meta_params is None:
        opt_state = vmap(rule.init)(params)
    else:
        opt_state = vmap(lambda meta, p: rule(meta).init(p))(population_meta_params, params)
    with torch.no_grad():
        initial_loss = vmap(task.loss)(params, task.population_batch(seed_list, 0, "train"))
    return {
        "params": params,
        "opt_state": opt_state,
        "step": torch.zeros(len(seed_list), dtype=torch.int64, device=device),
        "seeds": seeds.to(device=device, dtype=torch.int64),
        "initial_loss": initial_loss,
    }


def _member_update(rule: UpdateRule, task: Task, grads, state, params, step, batch, loss):
    # Positional on purpose: vmap maps positional arguments only. ``loss`` is the loss at
    # ``params`` the step computed with the gradient: a rule that needs it need not recompute it.
    loss_fn = None
    if rule.needs_loss_fn:
        loss_fn = FunctionalLoss(lambda p: task.loss(p, batch), known_loss=loss)
    return rule.update(grads, state, params, step=step, loss_fn=loss_fn)


def _population_grads_by_autograd(task: Task, params: Params, batch: Batch):
    # torch.func.grad refuses to run under the saved-tensor hooks that non-reentrant activation
    # checkpointing installs, so checkpointed steps differentiate the *sum* of the members'
    # losses with torch.autograd instead. Members are independent (the loss is vmapped), so the
    # gradient of the sum w.r.t. member i's parameters is member i's own gradient.
    with torch.enable_grad():
        leaves = {
            k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()
        }
        losses = vmap(task.loss)(leaves, batch)
        grads = torch.autograd.grad(
            losses.sum(), list(leaves.values()), create_graph=True, allow_unused=True
        )
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads)}
    return grads, losses


def _member_updates(rule: RuleOrFactory, task: Task, meta, grads, state, params, step, batch, loss):
    """Every member's update: by the shared ``rule`` (``meta`` None), or (ES, PES) by its own
    rule ``rule(meta_i)`` built from its meta-parameters."""
    if meta is None:
        return vmap(lambda *args: _member_update(rule, task, *args), randomness=RULE_RANDOMNESS)(
            grads, state, params, step, batch, loss
        )
    return vmap(lambda m, *args: _member_update(rule(m), task, *args), randomness=RULE_RANDOMNESS)(
        meta, grads, state, params, step, batch, loss
    )


def scaled_updates(updates: Params, scale: Tensor | None) -> Params:
    """Every member's updates (``[P, ...]`` each) times its factor ``scale`` (``[P]``); None
    leaves them as they are."""
    if scale is None:
        return updates
    return {k: u * scale.to(u.dtype).reshape(-1, *([1] * (u.ndim - 1))) for k, u in updates.items()}


def _inner_step(rule: RuleOrFactory, task: Task, params, state, step, batch, meta, scale=None):
    """One inner step of every member (see :func:`_member_updates` for ``rule`` and ``meta``)."""
    grads, loss = vmap(grad_and_value(task.loss))(params, batch)
    updates, state = _member_updates(rule, task, meta, grads, state, params, step, batch, loss)
    return apply_updates(params, scaled_updates(updates, scale)), state, loss


def _compiled_inner_step(*args):
    """:func:`_inner_step` compiled: Dynamo keeps one graph per task structure and rule (a
    shared rule's meta-parameters are graph inputs, so a rule rebuilt at new meta-parameters
    reuses it)."""
    return _compiled_step()(*args)


@functools.cache
def _compiled_step() -> Callable:
    return compile_quietly(_inner_step, dynamic=False, options=_cpu_codegen_options())


@functools.cache
def _compiled_scan(device_type: str) -> Callable:
    """:func:`_scanned_forward_truncation` compiled for ``device_type``. On the CPU the graph's
    wrapper is C++ (``cpp_wrapper``): the scan's loop then runs no Python between steps,
    1.3-1.7x faster than with Inductor's Python wrapper for the issue's MLP task
    (BENCHMARKS.md). Not measured on CUDA, which keeps Inductor's defaults."""
    options = {"cpp_wrapper": True, **_cpu_codegen_options()} if device_type == "cpu" else {}
    return compile_quietly(
        _scanned_forward_truncation, fullgraph=True, dynamic=False, options=options
    )


@functools.cache
def _cpu_codegen_options() -> dict[str, Any]:
    """Inductor options for the CPU graphs: 256-bit vectors where the CPU's widest are 512-bit.

    Why: the per-coordinate MLPs' hidden layers are narrow (8 units in ``ortho_mlp``), and with
    16-lane vectors Inductor runs a dim of 8 as masked partial loads and stores (a ReLU over
    ``[1280, 8]`` took 131 µs); with 8 lanes the same loops are whole vectors. Measured on the
    AMD EPYC VM (AVX-512), the default ``ortho_mlp`` inside (BENCHMARKS.md): the compiled
    forward truncation 1.15-1.4x faster at populations 8 and 64, the same at 1. A CPU whose
    widest vectors are narrower keeps Inductor's default (naming a width it lacks would turn
    vectorisation off), and so does a width the user set (``torch._inductor.config.cpp.simdlen``).
    The check compiles a probe once per process."""
    if torch._inductor.config.cpp.simdlen is not None:
        return {}
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        widest = pick_vec_isa().bit_width()
    except Exception:  # no C++ compiler, or an inductor without this probe: its defaults
        return {}
    return {"cpp.simdlen": 256} if widest == 512 else {}


def _scanned_forward_truncation(
    factory, task: Task, params, state, step, batches, final_batch, scales, meta
):
    """``K`` inner steps of every member with its own meta-parameters as one ``scan``:
    ``batches`` (and ``scales``, or None) carry the steps along dim 0, ``final_batch`` is the
    next step's, which scores the last update. Returns the new params, state, step, the
    ``[K, P]`` losses and the ``[P]`` training losses after the last update."""

    def body(carry, xs):
        params, state, step = carry
        batch, scale = xs if scales is not None else (xs, None)
        params, state, loss = _inner_step(factory, task, params, state, step, batch, meta, scale)
        # scan asks for a carry that aliases none of its inputs and keeps their layout.
        fresh = tree_map_only(Tensor, _fresh_contiguous, (params, state, step + 1))
        return fresh, loss.clone()

    xs = batches if scales is None else (batches, scales)
    (params, state, step), losses = scan(body, (params, state, step), xs)
    final = vmap(task.loss)(params, final_batch)
    return params, state, step, losses, final


def _fresh_contiguous(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _wants_meta_gradient(rule: RuleOrFactory) -> bool:
    """Whether autograd records the unroll for a meta-gradient: grad mode on, and a shared rule
    holding a tensor that requires grad (TBPTT's meta-parameters) in its fields, or in those of
    a rule it holds (a wrapper's ``base``, Muon's ``other``)."""
    if not torch.is_grad_enabled() or not isinstance(rule, UpdateRule):
        return False
    return any(t.requires_grad for t in _rule_tensors(rule))


def _rule_tensors(rule: UpdateRule) -> Iterator[Tensor]:
    """The tensors in ``rule``'s fields (UpdateRule: a dataclass) and its nested rules'."""
    for leaf in tree_leaves([getattr(rule, f.name) for f in dataclasses.fields(rule)]):
        if isinstance(leaf, UpdateRule):  # a dataclass, not a pytree: a leaf to tree_leaves
            yield from _rule_tensors(leaf)
        elif isinstance(leaf, Tensor):
            yield leaf


def _requiring_grad(t: Tensor) -> Tensor:
    if t.requires_grad or not (t.is_floating_point() or t.is_complex()):
        return t
    return t.detach().requires_grad_()


#: Graphs the compiled truncation may hold, one per task structure and rule factory: above
#: Dynamo's default limit of 8, which a task mixture with augmentation exceeds (5 members, each
#: plain or reparametrised, are 10 structures), and where a run past it fails (``fullgraph``).
MAX_COMPILED_STRUCTURES = 64


def _compiled_truncation(
    factory, task: Task, params, state, step, batches: Batch, final_batch: Batch, scales, meta
) -> tuple[Params, State, Tensor, Tensor, Tensor]:
    """The compiled :func:`_scanned_forward_truncation` (one graph per task structure and rule
    factory, whatever the truncation's length) on the carry (``params, state, step``, laid out as
    the body returns them) and the minibatches, stacked along a leading dim that is marked
    dynamic (one graph for every length from 2; Dynamo specialises a size-1 dim, so a
    truncation of one step, as an episode's last may be, compiles a second graph)."""
    for x in (*batches, scales):
        if x is not None:  # no schedule: no scales
            torch._dynamo.maybe_mark_dynamic(x, 0)
    compiled = _compiled_scan(step.device.type)
    return _within_compile_limit(
        compiled, task, factory, task, params, state, step, batches, final_batch, scales, meta
    )


def _within_compile_limit(compiled: Callable, task: Task, *args):
    """``compiled(*args)`` allowed up to :data:`MAX_COMPILED_STRUCTURES` graphs, past which a
    ``ValueError`` says what to do (the scan's ``fullgraph`` fails there; a per-step graph
    would silently fall back to the slow eager path)."""
    try:
        with torch._dynamo.config.patch(
            recompile_limit=MAX_COMPILED_STRUCTURES, fail_on_recompile_limit_hit=True
        ):
            return compiled(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise ValueError(
            f"compile=True (estimator.compile) compiles one graph per task structure (and "
            f"per carry layout), and this run needed more than {MAX_COMPILED_STRUCTURES} (the "
            f"last task: {type(task).__name__}); meta-train over a mixture of a few fixed "
            "structures (as configs/experiment/ortho_long_mixture.yaml does) or set "
            "estimator.compile=false"
        ) from err


def unroll(
    rule: RuleOrFactory,
    task: Task,
    carry: Carry,
    num_steps: int,
    *,
    population_meta_params: Params | None = None,
    eval_mode: str = "none",
    checkpoint: bool = False,
    compile: bool = False,
    update_schedule: Callable[[Tensor], Tensor] | None = None,
) -> Unroll:
    """Run ``num_steps`` inner steps of every member; see the module docstring.

    Args:
        rule: the shared update rule, or (with ``population_meta_params``) a factory such as
            ``lopt.rule`` that builds member ``i``'s rule from its meta-parameters.
        task: the task structure all members share.
        carry: the population's inner state (see :func:`init_carry`); not modified.
        num_steps: K, the truncation length.
        population_meta_params: per-member meta-parameters ``{name: [P, ...]}`` (ES, PES).
        eval_mode: held-out losses to compute: "none", "each" (after every update) or "final".
        checkpoint: recompute each inner step's activations in the backward pass
            (``torch.utils.checkpoint``, non-reentrant) so BPTT memory does not grow with the
            inner network's activations times K. Not for rules that call ``torch.func``
            themselves (``needs_loss_fn`` rules that differentiate ``loss_fn``).
        compile: compile the inner steps (see the module docstring): with
            ``population_meta_params`` (ES/PES, under ``torch.no_grad`` only) the truncation
            as one compiled scan, or each step as a compiled graph with ``eval_mode="each"``;
            with a shared rule (TBPTT, under autograd or not) each step as a compiled graph.
            Not with ``checkpoint``.
        update_schedule: a factor of each member's step index (``[P]`` int64 in, ``[P]``
            out; e.g. :func:`l2o.optim.schedules.run_annealing` over the episode's length)
            that multiplies its updates; the rule's state is not affected. None: no factor.

    Returns:
        ``Unroll(carry, losses [K, P], terms)``; ``terms.train[k]`` is the training loss after
        update ``k`` (on the next step's batch), ``terms.initial`` the episode's initial loss.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if eval_mode not in EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
    per_member = population_meta_params is not None
    if not per_member and not isinstance(rule, UpdateRule):
        raise TypeError("rule must be an UpdateRule (or a factory with population_meta_params)")
    if compile and checkpoint:
        raise ValueError("compile=True keeps each step's activations: not with checkpoint=True")
    if compile and per_member and torch.is_grad_enabled():
        raise ValueError(
            "compile=True with per-member meta-parameters (ES/PES) runs under torch.no_grad"
        )

    def inner_step(params, state, step, batch, meta):
        # The factor is computed outside the compiled graph: a schedule's length is a Python
        # number, and a graph specialised on it would recompile for every episode length.
        scale = None if update_schedule is None else update_schedule(step)
        args = (rule, task, params, state, step, batch, meta, scale)
        if compile:
            return _within_compile_limit(_compiled_inner_step, task, *args)
        if not checkpoint:
            return _inner_step(*args)
        grads, loss = _population_grads_by_autograd(task, params, batch)
        updates, state = _member_updates(rule, task, meta, grads, state, params, step, batch, loss)
        return apply_updates(params, scaled_updates(updates, scale)), state, loss

    seeds = [int(s) for s in carry["seeds"].tolist()]
    first = [int(s) for s in carry["step"].tolist()]  # one device sync per truncation
    params, state, step = carry["params"], carry["opt_state"], carry["step"]
    if compile:
        # The layout every step returns, from the first step on: an initial carry can hold
        # expanded tensors (and an empty one any strides), which a per-step graph would be
        # recompiled for and the scan's carry would keep.
        params, state, step = tree_map_only(Tensor, _fresh_contiguous, (params, state, step))
        if _wants_meta_gradient(rule):
            # The first steps' carry does not depend on the meta-parameters yet, the later
            # steps' does: as leaves that require grad (whose own gradients nobody asks for),
            # every step has the same guards, one graph instead of three. Only where a
            # meta-gradient is taken anyway: elsewhere it would keep every step's activations.
            params, state = tree_map_only(Tensor, _requiring_grad, (params, state))

    def member_steps(offset: int) -> list[int]:
        return [s + offset for s in first]

    def held_out(params: Params, offset: int) -> Tensor:
        return held_out_losses(task, params, seeds, member_steps(offset))

    def finish(params, state, step, losses: list[Tensor], evals: list[Tensor], final=None):
        if final is None:  # the last update's score: the training loss on the next step's batch
            final_batch = members_batch(task, seeds, member_steps(num_steps), "train")
            final = vmap(task.loss)(params, final_batch)
        if eval_mode == "final":
            evals.append(held_out(params, num_steps))
        terms = MetaLossTerms(
            train=torch.stack([*losses[1:], final]),
            initial=carry["initial_loss"],
            eval=torch.stack(evals) if evals else None,
        )
        new_carry = dict(carry, params=params, opt_state=state, step=step)
        return Unroll(new_carry, torch.stack(losses), terms)

    if compile and per_member and eval_mode != "each":
        batches = task.population_batches(seeds, first, num_steps, "train")
        final_batch = members_batch(task, seeds, member_steps(num_steps), "train")
        scales = None
        if update_schedule is not None:
            scales = torch.stack([update_schedule(step + k) for k in range(num_steps)])
        params, state, step, losses, final = _compiled_truncation(
            rule, task, params, state, step, batches, final_batch, scales, population_meta_params
        )
        return finish(params, state, step, list(losses), [], final)

    losses, evals = [], []
    for k in range(num_steps):
        batch = members_batch(task, seeds, member_steps(k), "train")
        if checkpoint:
            params, state, loss = activation_checkpoint(
                inner_step, params, state, step, batch, population_meta_params, use_reentrant=False
            )
        else:
            params, state, loss = inner_step(params, state, step, batch, population_meta_params)
        step = step + 1
        losses.append(loss)
        if eval_mode == "each":
            evals.append(held_out(params, k + 1))

    return finish(params, state, step, losses, evals)


def held_out_losses(
    task: Task, params: Params, seeds: Sequence[int], steps: Sequence[int]
) -> Tensor:
    """Members' held-out losses, ``[P]``: vmapped over the eval split's batches, or member by
    member when the task overrides ``eval_loss`` (e.g. a full held-out set)."""
    if type(task).eval_loss is Task.eval_loss:
        return vmap(task.loss)(params, members_batch(task, seeds, steps, "eval"))
    return torch.stack(
        [
            task.eval_loss({k: v[i] for k, v in params.items()}, seed, step)
            for i, (seed, step) in enumerate(zip(seeds, steps))
        ]
    )
