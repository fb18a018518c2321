"""LGL2O: the loss-guarded learned optimizer (Prémont-Schwarz, Vítků, Feyereisl, ICML 2022).

At step k with parameters x_k, gradient g_k and a loss evaluator f::

    x_L, sL' = learned.update(g_k, sL, x_k)     # learned candidate; learned state always advances
    x_F, sF' = fallback.update(g_k, sF, x_k)    # fallback candidate; fallback state always advances
    x_{k+1}  = x_L if f(x_L) <= f(x_F) else x_F

A non-finite learned candidate or loss always loses; if the fallback candidate is non-finite
too, no step is taken. If the fallback converges (SGD on strongly convex smooth losses, per the
paper), so does the guarded optimizer, because every accepted step is at least as good as the
fallback's.

Comparisons cost two loss evaluations. ``compare_every=n`` compares only every n-th step and in
between reuses the last winner (still rejecting a non-finite learned update, which is free to
detect). The guard is itself an :class:`~l2o.optim.base.UpdateRule` (``needs_loss_fn``), so it
vmaps inside meta-training unrolls and runs under the generic ``torch.optim`` adapter; under
vmap (a tensor ``step``, possibly different per member) both losses are evaluated every step
and ``compare_every`` selects which comparisons count.

``deferred=True`` makes the comparison cost one loss-and-gradient evaluation instead of two
(with ``compare_every=n``, on every n-th step only).
The learned candidate is taken tentatively and the fallback candidate kept; the next step's
loss evaluator (the next batch, in a training loop) is evaluated at both, which costs only the
fallback side, because the loss and gradient at the current parameters are what every step
computes anyway. The winner's gradient is the one the next candidates are computed from, so
the guarantee is LGL2O's with each comparison made on the next batch (a batch the candidates
were not computed from) instead of the current one. The last tentative step of a run is
confirmed by :meth:`GuardRule.settle` (``GuardedLearnedOptimizer.settle(closure)``).

``shadow=True`` adds a guarantee over the whole run, which a per-step comparison cannot give (a
sequence of learned steps, each better on its own batch, can end above the fallback alone). The
guard then also trains a *shadow*: a copy of the parameters that only the fallback ever steps,
i.e. the fallback-alone run the user would otherwise have made, on the same batches. At every
step both runs' losses on the step's batch are averaged (exponential moving averages with
``shadow_decay``); when the guarded run's average exceeds the shadow's by more than
``shadow_margin`` (relative), or its loss is not finite, the guarded run is restored to the
shadow (parameters and fallback state) and follows it for ``shadow_hold`` steps, twice as many
after each further restore, before the guard tries the learned candidates again. So the guarded
run's smoothed training loss does not stay more than ``shadow_margin`` above the fallback
alone's, and a learned optimizer that keeps falling behind gets a shrinking share of the steps.
It costs one more loss-and-gradient evaluation and one more fallback step per step, and a copy
of the parameters and of the fallback's state; eagerly, a step during a hold costs only the
step's own evaluation (the guarded run is the shadow then: no comparison, no second
evaluation). ``guard_stats`` counts the restores and the steps
that followed the shadow (those count as neither side's).

A restore, or the end of a hold, among a run's last steps leaves any average of those steps
partly on the other run, and a run less than ``shadow_margin`` behind is never restored. So when
the run's length is known (``total_steps``), the guard *commits* before the end:
``shadow_finish + 1`` steps before the last one it compares the two runs' averages without a
margin and ends on the better one, following the shadow for the rest of the run where the
shadow is ahead (or where it is already being followed). A guarded run kept there can still be
restored later, as on any step, if it falls more than the margin behind.

Non-finite state is never kept: when a side's new state holds a NaN or inf (a gradient with an
inf entry, an overflow), that side's state restarts from ``init`` and ``state_resets`` counts it,
so one bad gradient cannot disable the guard for the rest of training.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, NamedTuple, TypedDict

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

from l2o.learned.optimizer import CheckpointedOptimizer, CheckpointedRules
from l2o.optim import registry
from l2o.optim.adapter import (
    GROUP_PREFIX,
    ClosureLoss,
    _has_slots,
    _join_state,
    _store_state,
    keyed_params,
    scalar_loss,
)
from l2o.optim.base import (
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    apply_updates,
    as_loss_fn,
    check_hyperparameter,
    loss_at_call,
    lr_at,
)
from l2o.validation import boolean, positive_int

#: How many recent choices ``accept_rate`` averages over.
ACCEPT_WINDOW = 100

LEARNED, FALLBACK, NO_STEP = 1, 0, -1

#: The state entries that count the candidates' choices (left alone on a step that followed
#: the shadow run, ``shadow=True``).
_CHOICE_COUNTERS = (
    "learned_steps",
    "fallback_steps",
    "skipped_steps",
    "comparisons",
    "last_choice",
    "recent",
    "recent_count",
)

#: A shadow restore's hold stops doubling after this many restores (10 * 2**16 steps).
MAX_DOUBLINGS = 16


def _all_finite(tree: Any) -> Tensor:
    """One boolean: every floating-point tensor in the (nested) dict ``tree`` is finite."""
    leaves = [v for v in tree_leaves(tree) if isinstance(v, Tensor) and v.is_floating_point()]
    if not leaves:
        return torch.tensor(True)
    if _sums_first(leaves[0]) and _sums_are_finite(leaves):
        return torch.ones((), dtype=torch.bool, device=leaves[0].device)
    return torch.stack([torch.isfinite(v).all() for v in leaves]).all()


def _sums_first(leaf: Tensor) -> bool:
    """Check sums before entries: eagerly on the CPU, where ``isfinite(v).all()`` costs 10-20x
    a sum (a boolean tensor the size of ``v``; 8 ms of a guarded step over a 0.43M-parameter
    Transformer's state), and a Python bool is free. Not on an accelerator (no sync wanted) nor
    under a ``torch.func`` transform (no Python bool)."""
    return leaf.device.type == "cpu" and not torch._C._functorch.is_functorch_wrapped_tensor(leaf)


def _sums_are_finite(leaves: list[Tensor]) -> bool:
    """True if every leaf's sum is finite, which proves that its entries are (a NaN or an inf
    entry makes the sum non-finite). False does not prove the opposite: finite entries can
    overflow a sum, so the caller then checks the entries."""
    sums = [
        v.detach().sum(dtype=torch.promote_types(v.dtype, torch.float32)).to(torch.float32)
        for v in leaves
    ]
    return bool(torch.isfinite(torch.stack(sums)).all())


def _finite_or_fresh(new: State, fresh: Callable[[], State]) -> tuple[State, Tensor]:
    """``new`` if all of it is finite, else ``fresh()`` (the rule's initial state), and whether
    it was replaced. Eagerly, one check, and the initial state is built only when needed; under
    a ``torch.func`` transform (vmap) there is no Python bool: a ``torch.where`` per leaf."""
    ok = _all_finite(new)
    if not torch._C._functorch.is_functorch_wrapped_tensor(ok):
        if bool(ok):
            return new, torch.zeros_like(ok, dtype=torch.int64)
        return fresh(), torch.ones_like(ok, dtype=torch.int64)
    return _where_tree(~ok, fresh(), new), (~ok).long()


class Candidates(NamedTuple):
    """Both sides' candidate updates from one point, and both sides' new states."""

    learned: Params  # the learned update, times the guard's lr
    fallback: Params
    learned_ok: Tensor  # every entry of the update is finite
    fallback_ok: Tensor
    learned_state: State  # reset to ``init`` where it turned non-finite ...
    fallback_state: State
    resets: Tensor  # ... and how many sides were reset


class GuardState(TypedDict):
    """The guard's state (a plain dict at run time, so vmap and ``state_dict`` see no change)."""

    learned: State  # the learned rule's state
    fallback: State  # the fallback rule's state
    learned_steps: Tensor  # int64 counters of the side that was taken ...
    fallback_steps: Tensor
    skipped_steps: Tensor  # ... or of steps where neither candidate was finite
    comparisons: Tensor  # steps whose two losses were compared
    last_choice: Tensor  # LEARNED, FALLBACK or NO_STEP of the last comparison
    recent: Tensor  # [ACCEPT_WINDOW] ring buffer: 1 where the learned step was taken
    recent_count: Tensor  # updates so far (the ring buffer's write position)
    state_resets: Tensor  # sides whose state turned non-finite and was re-initialised


@dataclasses.dataclass(frozen=True)
class GuardRule(UpdateRule):
    """Compose a learned rule and a fallback rule into the LGL2O rule.

    Args:
        learned: the learned update rule (any :class:`UpdateRule`).
        fallback: the hand-designed rule whose convergence the guard inherits.
        lr: multiplier on the learned update (what LR schedulers scale).
        compare_every: compare losses on every n-th step (1 = every step).
        deferred: compare on the next step's loss evaluator, at the cost of one evaluation
            (see the module docstring); with ``compare_every=n``, on every n-th step.
        shadow: also train a fallback-alone shadow run and restore the guarded run to it when
            it falls behind (see the module docstring).
        shadow_margin: how far (relative) the guarded run's smoothed loss may exceed the
            shadow's before it is restored.
        shadow_decay: the decay of the two runs' loss averages (0.9: about 10 steps).
        shadow_hold: steps the guarded run follows the shadow after its first restore (doubled
            after each further one).
        total_steps: the run's length in steps, if known: the guard then commits to the
            better of the guarded run and the shadow ``shadow_finish + 1`` steps before the
            last step (``shadow=True``; see the module docstring).
        shadow_finish: how many of the run's last steps come after that commitment.
    """

    learned: UpdateRule
    fallback: UpdateRule
    lr: float = 1.0
    compare_every: int = 1
    deferred: bool = False
    shadow: bool = False
    shadow_margin: float = 0.01
    shadow_decay: float = 0.9
    shadow_hold: int = 10
    total_steps: int | None = None
    shadow_finish: int = 10

    needs_loss_fn: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("learned", "fallback"):
            if not isinstance(getattr(self, name), UpdateRule):
                raise TypeError(
                    f"GuardRule.{name} must be an UpdateRule, got {getattr(self, name)!r}"
                )
        check_hyperparameter("lr", self.lr)
        if not isinstance(self.compare_every, int) or self.compare_every < 1:
            raise ValueError(f"compare_every must be an integer >= 1, got {self.compare_every!r}")
        boolean("deferred", self.deferred)
        boolean("shadow", self.shadow)
        if not (isinstance(self.shadow_margin, (int, float)) and 0 <= self.shadow_margin < 1e9):
            raise ValueError(
                f"shadow_margin must be a finite number >= 0, got {self.shadow_margin!r}"
            )
        if not (isinstance(self.shadow_decay, (int, float)) and 0 <= self.shadow_decay < 1):
            raise ValueError(f"shadow_decay must be in [0, 1), got {self.shadow_decay!r}")
        if not isinstance(self.shadow_hold, int) or self.shadow_hold < 1:
            raise ValueError(f"shadow_hold must be an integer >= 1, got {self.shadow_hold!r}")
        if self.total_steps is not None and not (
            isinstance(self.total_steps, int)
            and not isinstance(self.total_steps, bool)
            and self.total_steps >= 1
        ):
            raise ValueError(
                f"total_steps must be an integer >= 1 or None, got {self.total_steps!r}"
            )
        if not isinstance(self.shadow_finish, int) or self.shadow_finish < 0:
            raise ValueError(f"shadow_finish must be an integer >= 0, got {self.shadow_finish!r}")

    def parameter_slots(self) -> frozenset[str] | None:
        parts = {
            "learned": self.learned.parameter_slots(),
            "fallback": self.fallback.parameter_slots(),
        }
        if any(slots is None for slots in parts.values()):
            return None  # a side that does not declare its slots: let the adapter infer all
        if self.shadow:
            parts["shadow_fallback"] = parts["fallback"]
        slots = {f"{side}/{path}" for side, slots in parts.items() for path in slots}
        slots |= {"pending"} if self.deferred else set()
        return frozenset(slots | ({"shadow"} if self.shadow else set()))

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        # The two rules and the mode are fixed for the guard's lifetime (a deferred guard's
        # state holds a pending candidate); these are what param groups carry.
        return ("lr", "compare_every")

    def init(self, params: Params) -> GuardState:
        device = next(iter(params.values())).device
        counter = torch.zeros((), dtype=torch.int64, device=device)
        deferred = {}
        if self.deferred:
            # The fallback candidate awaiting the next step's comparison, and whether one is.
            deferred = {
                "pending": {k: torch.zeros_like(p) for k, p in params.items()},
                "has_pending": torch.zeros((), dtype=torch.bool, device=device),
            }
        shadow = {}
        if self.shadow:
            # The fallback-alone run, and both runs' loss averages (float32 at least: a
            # bfloat16 average could not resolve a 1% margin).
            first = next(iter(params.values()))
            dtype = torch.promote_types(first.dtype, torch.float32)
            average = torch.zeros((), dtype=dtype, device=device)
            shadow = {
                "shadow": {k: p.clone() for k, p in params.items()},
                "shadow_fallback": self.fallback.init(params),
                "guarded_loss_average": average,
                "shadow_loss_average": average.clone(),
                "shadow_restores": counter.clone(),
                "shadow_hold": counter.clone(),  # steps left on the shadow after a restore
                "shadow_steps": counter.clone(),  # steps that followed the shadow
            }
        return {
            **deferred,
            **shadow,
            "learned": self.learned.init(params),
            "fallback": self.fallback.init(params),
            "learned_steps": counter,
            "fallback_steps": counter.clone(),
            "skipped_steps": counter.clone(),
            "comparisons": counter.clone(),
            "last_choice": torch.full((), LEARNED, dtype=torch.int64, device=device),
            # Ring buffer of recent choices (1 learned, 0 otherwise) for the acceptance rate.
            "recent": torch.zeros(ACCEPT_WINDOW, dtype=torch.int64, device=device),
            "recent_count": counter.clone(),
            "state_resets": counter.clone(),
        }

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        if loss_fn is None:
            raise ValueError(
                "the LGL2O guard compares losses and needs loss_fn; with the torch.optim class, "
                "call optimizer.step(closure) with a closure that returns the loss"
            )
        loss_fn = as_loss_fn(loss_fn)
        if self.shadow and not _batched(step) and int(state["shadow_hold"]) > 0:
            held = self._hold_on_shadow(grads, state, params, step, loss_fn)
            if held is not None:
                return held
        if self.deferred:
            updates, new_state = self._deferred_update(grads, state, params, step, loss_fn)
        else:
            updates, new_state = self._guarded_update(grads, state, params, step, loss_fn)
        if self.shadow:
            return self._follow_shadow(state, params, updates, new_state, step, loss_fn)
        return updates, new_state

    def _guarded_update(
        self, grads: Params, state: State, params: Params, step: Step, loss_fn: LossFn
    ) -> tuple[Params, State]:
        """LGL2O's step: the candidate with the lower loss (every ``compare_every`` steps)."""
        candidates = self._candidates(grads, state, params, step, loss_fn)
        learned_updates, fallback_updates = candidates.learned, candidates.fallback

        if _batched(step):  # under vmap: no data-dependent skipping of the losses
            compares = (step % self.compare_every == 0).reshape(())
            measured = self._compare(params, learned_updates, fallback_updates, loss_fn)
            choice = torch.where(compares, measured, state["last_choice"])
            compared = compares.long()
        elif int(step) % self.compare_every == 0:
            choice = self._compare(params, learned_updates, fallback_updates, loss_fn)
            compared = torch.ones((), dtype=torch.int64, device=choice.device)
        else:
            choice = state["last_choice"]
            compared = torch.zeros((), dtype=torch.int64, device=choice.device)
        # Whatever was decided, a non-finite candidate never reaches the parameters.
        choice = torch.where((choice == LEARNED) & ~candidates.learned_ok, FALLBACK, choice)
        choice = torch.where((choice == FALLBACK) & ~candidates.fallback_ok, NO_STEP, choice)

        updates = _select(choice, learned_updates, fallback_updates, params)
        new_state = _count(state, choice, compared)
        new_state.update(_inner_states(state, candidates))
        return updates, new_state

    def _follow_shadow(
        self,
        state: State,
        params: Params,
        updates: Params,
        new_state: State,
        step: Step,
        loss_fn: LossFn,
    ) -> tuple[Params, State]:
        """``shadow=True``: step the fallback-alone shadow run on this step's batch, update both
        runs' loss averages and, where the guarded run has fallen behind, replace its step by
        the one that moves it onto the shadow (see the module docstring)."""
        guarded_loss = scalar_loss(loss_at_call(loss_fn, params), "loss_fn")
        shadow = state["shadow"]
        shadow_loss, shadow_grads = loss_fn.value_and_grad(shadow)
        shadow_loss = scalar_loss(shadow_loss, "loss_fn")
        shadow_updates, moves, shadow_fallback, reset = self._shadow_fallback_step(
            shadow_grads, state, shadow, params, step, loss_fn
        )
        # The shadow never takes a non-finite step nor keeps a non-finite state, as each side.
        shadow = {k: torch.where(moves, p + shadow_updates[k], p) for k, p in shadow.items()}
        guarded_ok, shadow_ok = torch.isfinite(guarded_loss), torch.isfinite(shadow_loss)
        guarded_average = self._averaged(state["guarded_loss_average"], guarded_loss, guarded_ok)
        shadow_average = self._averaged(state["shadow_loss_average"], shadow_loss, shadow_ok)
        # A shadow whose own loss is not finite (the fallback alone diverged) is no reference.
        gap = guarded_average - shadow_average
        margin = torch.where(self._commits(step, gap), 0.0, self.shadow_margin)
        behind = shadow_ok & (~guarded_ok | (gap > margin * shadow_average.abs()))
        holding = state["shadow_hold"] > 0
        restore = behind & ~holding
        follow = restore | (holding & shadow_ok)
        # Each restore holds the guarded run on the shadow twice as long as the one before, so
        # a learned optimizer that keeps falling behind costs a vanishing share of the steps.
        hold = self.shadow_hold * 2 ** torch.clamp(state["shadow_restores"], max=MAX_DOUBLINGS)
        remaining = torch.where(restore, hold, torch.clamp(state["shadow_hold"] - 1, min=0))
        remaining = torch.where(follow, self._held_to_the_end(step, remaining), remaining)

        updates = {k: torch.where(follow, shadow[k] - p, updates[k]) for k, p in params.items()}
        # A followed step took neither candidate: the choice counters stay as they were.
        new_state = {
            **new_state,
            **{k: torch.where(follow, state[k], new_state[k]) for k in _CHOICE_COUNTERS},
        }
        new_state["fallback"] = _where_tree(follow, shadow_fallback, new_state["fallback"])
        if self.deferred:  # on the shadow: nothing is pending
            new_state["pending"] = _where_tree(follow, shadow, new_state["pending"])
            new_state["has_pending"] = new_state["has_pending"] & ~follow
        new_state.update(
            shadow=shadow,
            shadow_fallback=shadow_fallback,
            guarded_loss_average=torch.where(follow, shadow_average, guarded_average),
            shadow_loss_average=shadow_average,
            shadow_restores=state["shadow_restores"] + restore.long(),
            shadow_hold=remaining,
            shadow_steps=state["shadow_steps"] + follow.long(),
            state_resets=new_state["state_resets"] + reset,
        )
        return updates, new_state

    def _hold_on_shadow(
        self, grads: Params, state: State, params: Params, step: Step, loss_fn: LossFn
    ) -> tuple[Params, State] | None:
        """A step during a shadow hold, eagerly: the guarded run *is* the shadow (it was put
        onto it and has followed it since), so the step's own loss and gradient are the
        shadow's and neither the candidates' comparison nor a second evaluation is needed: one
        fallback step, which both runs take, and the learned state advanced on the gradient (so
        that it is current when the hold ends). The result is :meth:`_follow_shadow`'s but for
        rounding (the shadow becomes the guarded parameters exactly). ``None`` when the loss is
        not finite: the full step then decides, as it would have."""
        loss = scalar_loss(loss_at_call(loss_fn, params), "loss_fn")
        if not bool(torch.isfinite(loss)):
            return None
        _, learned_state = self.learned.update(grads, state["learned"], params, step=step)
        learned_state, learned_reset = _finite_or_fresh(
            learned_state, lambda: self.learned.init(params)
        )
        updates, moves, shadow_fallback, fallback_reset = self._shadow_fallback_step(
            grads, state, params, params, step, loss_fn
        )
        if not bool(moves):
            updates = {k: torch.zeros_like(p) for k, p in params.items()}
        shadow = {k: p + updates[k] for k, p in params.items()}
        average = self._averaged(state["shadow_loss_average"], loss, torch.isfinite(loss))
        new_state = {
            **state,
            "learned": learned_state,
            "fallback": shadow_fallback,
            "shadow": shadow,
            "shadow_fallback": shadow_fallback,
            "guarded_loss_average": average,
            "shadow_loss_average": average,
            "shadow_hold": self._held_to_the_end(step, state["shadow_hold"] - 1),
            "shadow_steps": state["shadow_steps"] + 1,
            "state_resets": state["state_resets"] + learned_reset + fallback_reset,
        }
        if self.deferred:  # on the shadow: nothing is pending
            new_state["pending"] = shadow
        return updates, new_state

    def _shadow_fallback_step(
        self, grads: Params, state: State, at: Params, params: Params, step: Step, loss_fn: LossFn
    ) -> tuple[Params, Tensor, State, Tensor]:
        """The shadow run's fallback step from ``at`` on ``grads``: its updates, whether they are
        all finite, and its new state (a fresh one, from ``params``, where it is not finite)
        with the reset count."""
        updates, fallback_state = self.fallback.update(
            grads,
            state["shadow_fallback"],
            at,
            step=step,
            loss_fn=loss_fn if self.fallback.needs_loss_fn else None,
        )
        fallback_state, reset = _finite_or_fresh(fallback_state, lambda: self.fallback.init(params))
        return updates, _all_finite(updates), fallback_state, reset

    def _commits(self, step: Step, like: Tensor) -> Tensor:
        """Whether ``step`` is the one that commits to the better run (``total_steps`` known):
        the comparison then has no margin, and a run that follows the shadow keeps it."""
        if self.total_steps is None:
            return torch.zeros((), dtype=torch.bool, device=like.device)
        commit_step = self.total_steps - self.shadow_finish - 1
        if isinstance(step, Tensor):  # under vmap: per member
            return (step == commit_step).reshape(())
        return torch.tensor(step == commit_step, device=like.device)

    def _held_to_the_end(self, step: Step, remaining: Tensor) -> Tensor:
        """``remaining`` hold steps, extended to the run's end at the committing step."""
        if self.total_steps is None:
            return remaining
        to_the_end = self.total_steps - 1 - step
        if not isinstance(to_the_end, Tensor):
            to_the_end = torch.tensor(to_the_end, device=remaining.device)
        extended = torch.maximum(remaining, to_the_end.reshape(()).to(remaining.dtype))
        return torch.where(self._commits(step, remaining), extended, remaining)

    def _averaged(self, average: Tensor, loss: Tensor, finite: Tensor) -> Tensor:
        """The moving average with ``loss`` folded in (unchanged by a non-finite loss). Both runs'
        averages start at 0 and see the same steps, so their ratio needs no bias correction."""
        decay = self.shadow_decay
        folded = decay * average + (1 - decay) * loss.detach().to(average.dtype)
        return torch.where(finite, folded, average)

    def _candidates(
        self, grads: Params, state: State, params: Params, step: Step, loss_fn: LossFn
    ) -> Candidates:
        """Both sides' candidate updates from ``params`` and their new states."""
        fallback_loss_fn = loss_fn if self.fallback.needs_loss_fn else None
        learned_updates, learned_state = self.learned.update(
            grads, state["learned"], params, step=step
        )
        lr = lr_at(self.lr, step)
        learned_updates = {k: u * lr for k, u in learned_updates.items()}
        fallback_updates, fallback_state = self.fallback.update(
            grads, state["fallback"], params, step=step, loss_fn=fallback_loss_fn
        )
        learned_state, learned_reset = _finite_or_fresh(
            learned_state, lambda: self.learned.init(params)
        )
        fallback_state, fallback_reset = _finite_or_fresh(
            fallback_state, lambda: self.fallback.init(params)
        )
        return Candidates(
            learned=learned_updates,
            fallback=fallback_updates,
            learned_ok=_all_finite(learned_updates),
            fallback_ok=_all_finite(fallback_updates),
            learned_state=learned_state,
            fallback_state=fallback_state,
            resets=learned_reset + fallback_reset,
        )

    def _deferred_update(
        self, grads: Params, state: State, params: Params, step: Step, loss_fn: LossFn
    ) -> tuple[Params, State]:
        """``deferred=True``: decide the pending comparison on this step's loss, step from the
        winner with the winner's gradient, and, on a comparing step (every
        ``compare_every``-th), leave the new comparison pending; in between, take the last
        winner's candidate as the plain guard does."""
        batched = _batched(step)
        base, grads, state = self._settle(grads, state, params, loss_fn, batched=batched)
        candidates = self._candidates(grads, state, base, step, loss_fn)
        learned_ok, fallback_ok = candidates.learned_ok, candidates.fallback_ok
        if batched:
            compares = (step % self.compare_every == 0).reshape(())
        else:
            compares = torch.tensor(int(step) % self.compare_every == 0, device=learned_ok.device)
        # On a comparing step the learned candidate is taken; if the fallback's is finite, the
        # next step compares them. Otherwise (a non-finite side, or a step between
        # comparisons) the choice is made and counted now.
        pending = compares & learned_ok & fallback_ok
        choice = torch.where(compares, LEARNED, state["last_choice"])
        choice = torch.where((choice == LEARNED) & ~learned_ok, FALLBACK, choice)
        choice = torch.where((choice == FALLBACK) & ~fallback_ok, NO_STEP, choice)
        chosen = _select(choice, candidates.learned, candidates.fallback, params)
        updates = {k: base[k] - params[k] + chosen[k] for k in params}
        new_state = _count(state, choice, torch.zeros_like(state["comparisons"]), where=~pending)
        new_state.update(_inner_states(state, candidates))
        # Nothing pending: keep the winner, never a non-finite candidate.
        new_state["pending"] = {
            k: torch.where(pending, base[k] + candidates.fallback[k], base[k]) for k in params
        }
        new_state["has_pending"] = pending
        return updates, new_state

    def settle(self, state: State, params: Params, loss_fn: LossFn) -> tuple[Params, State]:
        """Decide a deferred guard's pending comparison at ``params`` (the tentative learned
        candidate) without taking a new step: the updates that move to the winner, and the
        new state. No change when nothing is pending or the guard is not deferred. Under vmap
        (a batched state) every member evaluates its pending point, as in a step."""
        if not self.deferred:
            return {k: torch.zeros_like(p) for k, p in params.items()}, state
        grads = {k: torch.zeros_like(p) for k, p in params.items()}
        batched = torch._C._functorch.is_functorch_wrapped_tensor(state["has_pending"])
        base, _, state = self._settle(grads, state, params, as_loss_fn(loss_fn), batched=batched)
        return {k: base[k] - params[k] for k in params}, state

    def _settle(
        self, grads: Params, state: State, params: Params, loss_fn: LossFn, *, batched: bool
    ) -> tuple[Params, Params, State]:
        """The pending comparison decided on ``loss_fn``: the winner (``params``, the tentative
        learned candidate, or the pending fallback candidate), its gradient, and the state
        with the decision counted and nothing pending."""
        has_pending = state["has_pending"]
        if not batched and not bool(has_pending):
            return params, grads, state
        pending = state["pending"]
        if batched:  # under vmap every member evaluates; one with nothing pending ignores it
            pending = {k: torch.where(has_pending, pending[k], params[k]) for k in params}
        learned_loss = loss_at_call(loss_fn, params)
        fallback_loss, fallback_grads = loss_fn.value_and_grad(pending)
        choice = _winner(learned_loss, fallback_loss)
        learned_won = choice == LEARNED
        base = {k: torch.where(learned_won, params[k], pending[k]) for k in params}
        grads = {k: torch.where(learned_won, grads[k], fallback_grads[k]) for k in params}
        settled = _count(state, choice, has_pending.long(), where=has_pending)
        settled["has_pending"] = torch.zeros_like(has_pending)
        return base, grads, settled

    def _compare(
        self, params: Params, learned_updates: Params, fallback_updates: Params, loss_fn: LossFn
    ) -> Tensor:
        learned_loss = loss_fn(apply_updates(params, learned_updates))
        fallback_loss = loss_fn(apply_updates(params, fallback_updates))
        return _winner(learned_loss, fallback_loss)


def _batched(step: Step) -> bool:
    """A tensor ``step`` means a vmapped unroll: no data-dependent Python branching."""
    return isinstance(step, Tensor)


def _winner(learned_loss: Any, fallback_loss: Any) -> Tensor:
    """LEARNED if the learned loss is finite and no worse (or the fallback's is not finite)."""
    learned_loss = scalar_loss(learned_loss, "the guard's loss_fn")
    fallback_loss = scalar_loss(fallback_loss, "the guard's loss_fn")
    learned_wins = torch.isfinite(learned_loss) & (
        (learned_loss <= fallback_loss) | ~torch.isfinite(fallback_loss)
    )
    return torch.where(learned_wins, LEARNED, FALLBACK).to(torch.int64)


def _where_tree(condition: Tensor, chosen: Any, otherwise: Any) -> Any:
    """``chosen`` where ``condition`` else ``otherwise``, leaf by leaf (non-tensor leaves are
    ``otherwise``'s)."""
    return tree_map(
        lambda a, b: torch.where(condition, a, b) if isinstance(b, Tensor) else b,
        chosen,
        otherwise,
    )


def _select(choice: Tensor, learned: Params, fallback: Params, params: Params) -> Params:
    """The chosen side's updates (zero for NO_STEP)."""
    return {
        k: torch.where(
            choice == LEARNED,
            learned[k],
            torch.where(choice == FALLBACK, fallback[k], torch.zeros_like(p)),
        )
        for k, p in params.items()
    }


def _count(state: State, choice: Tensor, compared: Tensor, where: Tensor | None = None) -> State:
    """``state`` with the decision ``choice`` counted (only where ``where``, if given): the
    per-side counters, comparisons, the last comparison's winner and the ring buffer of recent
    choices. Every other entry is carried over."""
    count = torch.ones_like(compared) if where is None else where.long()
    took_learned = (choice == LEARNED).long() * count
    slot = state["recent_count"] % ACCEPT_WINDOW
    written = (torch.arange(ACCEPT_WINDOW, device=slot.device) == slot) & count.bool()
    return {
        **state,
        "learned_steps": state["learned_steps"] + took_learned,
        "fallback_steps": state["fallback_steps"] + (choice == FALLBACK).long() * count,
        "skipped_steps": state["skipped_steps"] + (choice == NO_STEP).long() * count,
        "comparisons": state["comparisons"] + compared,
        # Remember the side that won the last comparison, not a forced substitution.
        "last_choice": torch.where(compared.bool(), choice, state["last_choice"]),
        "recent": torch.where(written, took_learned, state["recent"]),
        "recent_count": state["recent_count"] + count,
    }


def _inner_states(state: State, candidates: Candidates) -> State:
    """The two sides' new states and the updated reset counter."""
    resets = candidates.resets
    return {
        "learned": candidates.learned_state,
        "fallback": candidates.fallback_state,
        "state_resets": state.get("state_resets", torch.zeros_like(resets)) + resets,
    }


def guard_stats(state: State) -> dict[str, float]:
    """Counts from a guard state: steps taken by each side and the recent acceptance rate."""
    seen = min(int(state["recent_count"]), ACCEPT_WINDOW)
    recent = state["recent"][:seen] if seen < ACCEPT_WINDOW else state["recent"]
    return {
        "learned_steps": int(state["learned_steps"]),
        "fallback_steps": int(state["fallback_steps"]),
        "skipped_steps": int(state["skipped_steps"]),
        "comparisons": int(state["comparisons"]),
        "state_resets": int(state.get("state_resets", 0)),
        # Restores of the guarded run to the fallback-alone shadow (shadow=True only).
        "shadow_restores": int(state.get("shadow_restores", 0)),
        "shadow_steps": int(state.get("shadow_steps", 0)),
        "accept_rate": float(recent.float().mean()) if seen else float("nan"),
        "last_choice": {LEARNED: "learned", FALLBACK: "fallback", NO_STEP: "none"}[
            int(state["last_choice"])
        ],
    }


class GuardedLearnedOptimizer(CheckpointedOptimizer):
    """LGL2O as a drop-in ``torch.optim.Optimizer``: a shipped or saved learned optimizer,
    guarded by a hand-designed fallback.

    ``step(closure)`` needs a closure (it zeroes the gradients, computes the loss, calls
    ``backward`` and returns the loss): the guard evaluates it at both candidates. By default the
    losses are compared on the closure's batch; ``step(closure, guard_closure=f)`` compares them
    on whatever ``f`` computes instead (e.g. a fixed or held-out batch; ``f`` need not call
    ``backward`` and runs without autograd). Each param group is guarded on its own.

    ``deferred=True`` compares each step's candidates on the next step's closure (one extra
    forward and backward per step instead of two; see :mod:`l2o.guard`). The parameters
    between steps are then the tentative learned candidate: call :meth:`settle` with a closure
    before evaluating or saving the final model to decide the last comparison.

    ``shadow=True`` also trains the fallback alone on a copy of the parameters (the run you
    would have made without the learned optimizer, on the same closures) and puts the model
    back onto that copy whenever its smoothed training loss is more than ``shadow_margin``
    above the copy's: a bound on the whole run, not only on each step, for one more closure
    call and fallback step per step, and a copy of the parameters and the fallback's state.

    Args:
        params: parameters or param-group dicts.
        checkpoint: a shipped checkpoint name (``"default"``) or a checkpoint path.
        fallback: a registered optimizer name (:func:`l2o.optim.names`).
        fallback_kwargs: the fallback's hyper-parameters (e.g. ``{"lr": 1e-3}``).
        lr: multiplier on the learned step (what LR schedulers scale).
        compare_every: compare losses every n-th step (in between, the last winner is taken).
        deferred: compare on the next step's closure (cheaper; see above).
        shadow: keep a fallback-alone shadow run and restore to it when behind (see above).
        shadow_margin: the relative excess of the smoothed loss over the shadow's that
            triggers a restore.
        total_steps: optimizer steps of the run, if known. For a checkpoint meta-trained with
            an update schedule (:class:`~l2o.learned.optimizer.LearnedOptimizer`), the
            learned candidate and the fallback's ``lr`` (and so the shadow run) are annealed
            over them alike, so that the guard compares like with like during the cool-down.
            With ``shadow=True`` the guard also commits to the better of the guarded run and
            the shadow 11 steps before the end, without a margin (see :mod:`l2o.guard`).
        update_schedule: anneal so instead of as the checkpoint's card says (e.g. ``"wsd"``).
        ns_dtype: the learned candidate's Newton–Schulz dtype instead of the card's (e.g.
            ``"bfloat16"``; :class:`~l2o.learned.optimizer.LearnedOptimizer`).
        compile: the learned candidate's per-coordinate work through ``torch.compile``
            (:class:`~l2o.learned.optimizer.LearnedOptimizer`).
    """

    def __init__(
        self,
        params: Iterable[Any],
        checkpoint: str | os.PathLike = "default",
        fallback: str = "adam",
        fallback_kwargs: Mapping[str, Any] | None = None,
        lr: float = 1.0,
        compare_every: int = 1,
        deferred: bool = False,
        total_steps: int | None = None,
        shadow: bool = False,
        shadow_margin: float = 0.01,
        update_schedule: str | None = None,
        ns_dtype: str | None = None,
        compile: bool = False,
    ) -> None:
        self.learned = CheckpointedRules(
            checkpoint, total_steps, update_schedule, ns_dtype, compile
        )
        # (a constant checkpoint's rules ignore the run's length; the shadow guard uses it)
        run_length = None if total_steps is None else positive_int("total_steps", total_steps)
        fallback_kwargs = dict(fallback_kwargs or {})
        self.fallback = self.learned.annealed_fallback(registry.get(fallback, **fallback_kwargs))
        if self.fallback.needs_loss_fn:
            raise ValueError(
                f"fallback {fallback!r} needs its own loss evaluations; pick a first-order "
                "fallback (e.g. 'sgd' or 'adam')"
            )
        identity = {
            "checkpoint": self.learned.id,
            "fallback": fallback,
            "fallback_kwargs": {k: v for k, v in fallback_kwargs.items() if _plain(v)},
        }
        if deferred:  # its state holds a pending candidate: never resumed by a plain guard
            identity["deferred"] = True
        if shadow:  # its state holds the shadow run
            identity["shadow"] = True
        self._guard_closure: Callable[[], Any] | None = None
        self._warned_reset = False

        def guard_rule(device: torch.device) -> GuardRule:
            return GuardRule(
                learned=self.learned.rule(device),
                fallback=self.fallback,
                deferred=deferred,
                shadow=shadow,
                shadow_margin=shadow_margin,
                total_steps=run_length,
            )

        super().__init__(
            params,
            guard_rule,
            identity,
            self.learned.annealed,
            lr=lr,
            compare_every=compare_every,
        )

    def step(  # type: ignore[override]
        self,
        closure: Callable[[], Any] | None = None,
        guard_closure: Callable[[], Any] | None = None,
    ) -> Any:
        """One guarded step; see the class docstring for ``closure`` and ``guard_closure``."""
        if guard_closure is not None and self.rule.shadow:
            raise ValueError(
                "a shadow guard trains its shadow run on the training closure, so it takes no "
                "guard_closure; build the optimizer with shadow=False to compare on another batch"
            )
        if guard_closure is not None and self.rule.deferred:
            raise ValueError(
                "a deferred guard compares on the training closure's next batch, so it takes no "
                "guard_closure; build the optimizer with deferred=False to compare on another "
                "batch"
            )
        self._guard_closure = guard_closure
        try:
            loss = super().step(closure)
        finally:
            self._guard_closure = None
        self._warn_once_on_reset()
        return loss

    @torch.no_grad()
    def settle(self, closure: Callable[[], Any]) -> None:
        """A deferred guard: decide the last step's pending comparison on ``closure``'s loss,
        leaving the parameters at the winner (no new step is taken). Call it before
        evaluating or saving the final model; later steps go on as before. Nothing happens
        when the guard is not deferred or nothing is pending."""
        if not self.rule.deferred:
            return
        for group in self.param_groups:
            live = {k: p for k, p in keyed_params(group).items() if _has_slots(self.state[p])}
            if not live:
                continue
            rule = self._group_rule(group)
            anchor = self.state[group["params"][0]]
            state = _join_state({k: self.state[p] for k, p in live.items()}, anchor)
            params = {k: p.detach().clone() for k, p in live.items()}
            try:
                updates, new_state = rule.settle(state, params, ClosureLoss(closure, live))
            finally:  # the closure moved the live parameters (or raised): put them back
                for k, p in live.items():
                    p.copy_(params[k])
            for k, p in live.items():
                p.add_(updates[k])
            per_param = {k: self.state[p] for k, p in live.items()}
            _store_state(new_state, per_param, anchor, rule.parameter_slots())

    def _warn_once_on_reset(self) -> None:
        if self._warned_reset:
            return
        state = self._guard_state(self.param_groups[0])
        if state is not None and int(state.get("state_resets", 0)) > 0:
            self._warned_reset = True
            warnings.warn(
                "GuardedLearnedOptimizer: a step produced non-finite optimizer state (a NaN or "
                "inf gradient?); the affected state was reset and the step skipped or taken by "
                "the finite side. guard_stats['state_resets'] counts these; warned once.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _loss_fn(self, closure, live, known_loss):
        if self._guard_closure is None:
            return super()._loss_fn(closure, live, known_loss)
        return ClosureLoss(_without_grad(self._guard_closure), live)

    @property
    def guard_stats(self) -> dict[str, Any]:
        """Steps taken by each side, comparisons, recent acceptance rate, summed over groups."""
        states = (self._guard_state(group) for group in self.param_groups)
        per_group = [guard_stats(state) for state in states if state is not None]
        if not per_group:
            return {
                "learned_steps": 0,
                "fallback_steps": 0,
                "skipped_steps": 0,
                "comparisons": 0,
                "state_resets": 0,
                "shadow_restores": 0,
                "shadow_steps": 0,
                "accept_rate": float("nan"),
                "last_choice": "none",
            }
        total = {k: sum(s[k] for s in per_group) for k in per_group[0] if k not in _NON_SUMMED}
        total["accept_rate"] = sum(s["accept_rate"] for s in per_group) / len(per_group)
        total["last_choice"] = per_group[-1]["last_choice"]
        return total

    def _guard_state(self, group: Mapping[str, Any]) -> State | None:
        anchor = self.state.get(group["params"][0], {})
        prefix = GROUP_PREFIX
        found = {k[len(prefix) :]: v for k, v in anchor.items() if k.startswith(prefix)}
        return found if "learned_steps" in found else None


_NON_SUMMED = ("accept_rate", "last_choice")


def _plain(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (tuple, list)) and all(_plain(v) for v in value)
    )


def _without_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()

    return run
