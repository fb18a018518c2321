"""Gradient estimators over truncated unrolls: truncated BPTT, antithetic ES and PES.

All three share the episode machinery of :class:`TruncatedEstimator`. A population of inner
trainings runs in lock-step through *episodes* of ``T`` inner steps (``horizon``; constant, or
drawn log-uniformly per episode), cut into *truncations* of ``K`` steps (``truncation``; the
last one of an episode is shorter when K does not divide T). ``estimate`` advances one
truncation and returns an estimate of the gradient of its meta-loss (``l2o.meta.losses``)
w.r.t. the meta-parameters. When an episode ends the population restarts: fresh instance
seeds, hence fresh initial parameters and data, fresh rule state, and, for a
:class:`~l2o.tasks.base.TaskFamily`, a freshly sampled task. A member whose inner loss went
non-finite restarts alone (as learned_optimization's truncated steps reset each member on its
own): a fresh instance of the same task at step 0, while the others go on; its contribution is
left out of the estimate where the estimator allows it (ES and PES drop the pair; TBPTT masks its
meta-loss, though a NaN inside its backward pass can still reach the gradient, which the trainer
then skips).

Estimators (``get_estimator(name, **kwargs)``):

``tbptt`` -- :class:`TruncatedBPTT`. Autograd through the K-step unroll; the carry is detached
    between truncations, so the effect of the meta-parameters on the state a truncation starts
    from is ignored: low variance, biased towards short-horizon (greedy) behaviour.

``es`` -- :class:`ES`, antithetic evolution strategies over the truncation (Salimans et al.
    2017). With ``N = population / 2`` pairs sharing instance and data, ``eps_i ~ N(0, I)``::

        g = sum_i (L(theta + sigma eps_i) - L(theta - sigma eps_i)) eps_i / (2 sigma N)

    Unbiased for the Gaussian-smoothed truncated loss; no backward pass (runs under
    ``torch.no_grad``), but shares TBPTT's truncation bias. Each pair carries one inner state
    (the positive member's) into the next truncation.

``pes`` -- :class:`PES`, persistent evolution strategies (Vicol, Metz, Sohl-Dickstein, ICML
    2021). Every particle keeps its own inner state across truncations, and each pair keeps
    ``xi_i``, the sum of the perturbations it has been run with since its episode started::

        xi_i <- xi_i + eps_i
        g     = sum_i (L_i^+ - L_i^-) xi_i / (2 sigma N)

    (the paper's ``sum (L+ - L-) xi / (2 sigma^2 N)`` with perturbations ``sigma eps``).
    Summed over an episode's truncations this is an unbiased estimate of the gradient of the
    whole episode's (smoothed) meta-loss: no truncation bias, at the price of variance that
    grows with the number of truncations.

Every estimator's state is a dict of tensors, ints, floats and dicts of them (see
:mod:`l2o.meta.base`); a task drawn from a family is recorded by its sample seed and rebuilt
with ``family.sample(seed)``. All randomness comes from the ``generator`` passed in, so the
same generator state gives the same estimates.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._pytree import tree_map, tree_map_only

from l2o.learned.base import LOpt
from l2o.meta.base import Estimate, EstimatorState, GradientEstimator
from l2o.meta.losses import get_meta_loss
from l2o.meta.unroll import Unroll, detach_carry, finite_losses, init_carry, unroll
from l2o.optim.base import Params, check_hyperparameter
from l2o.optim.schedules import Schedule, check_update_schedule, run_annealing
from l2o.registry import Registry
from l2o.tasks.base import Task, TaskFamily
from l2o.validation import boolean, log_uniform, positive_int

HORIZON_SCHEDULES = ("constant", "log_uniform")
#: Each weighting as a function of the truncation's midpoint ``x`` in [0, 1], of mean 1.
_TRUNCATION_WEIGHTS = {
    "uniform": lambda x: 1.0,
    "linear": lambda x: 2.0 * x,
    "quadratic": lambda x: 3.0 * x * x,
}
TRUNCATION_WEIGHTINGS = tuple(_TRUNCATION_WEIGHTS)


def check_truncation_weighting(weighting: str) -> str:
    """``weighting`` if it names a truncation weighting, else ValueError naming the choices."""
    if weighting not in _TRUNCATION_WEIGHTS:
        raise ValueError(
            f"truncation_weighting must be one of {TRUNCATION_WEIGHTINGS}, got {weighting!r}"
        )
    return weighting


def truncation_weight(weighting: str, start: int, num_steps: int, horizon: int) -> float:
    """The factor on the gradient estimate of the truncation over steps ``[start, start +
    num_steps)`` of a ``horizon``-step episode. With ``x`` the truncation's midpoint as a
    fraction of the episode: ``uniform`` 1, ``linear`` ``2 x``, ``quadratic`` ``3 x^2`` -- each
    of mean 1 over an episode (the integral over ``x`` in [0, 1]), so the meta-gradient's scale
    and the learning rate keep their meaning while the episode's end weighs more.

    Every estimator's estimate is linear in its truncation's meta-loss, so weighting the
    estimate is weighting that truncation's term of the episode's meta-loss: ``sum_t w_t L_t``
    instead of ``sum_t L_t``. A meta-objective weighted to the end of training asks the learned
    optimizer for a low loss late in a run rather than fast early progress (the greedy
    behaviour that short-horizon meta-training is known for; Wu et al., ICLR 2018)."""
    midpoint = (start + num_steps / 2) / horizon
    return _TRUNCATION_WEIGHTS[check_truncation_weighting(weighting)](midpoint)


_SEED_HIGH = 2**31 - 1
#: Tasks kept built per estimator (a family's tasks are rebuilt from their seed when evicted).
_TASK_CACHE_SIZE = 4


def median_episode_length(estimator_config: Mapping[str, Any]) -> int | None:
    """The median number of inner steps of a meta-training episode, from an estimator's config
    (a card's ``config.estimator``): ``horizon`` for a constant schedule, and for
    ``log_uniform`` the geometric mean ``round(sqrt(min_horizon * horizon))`` (the median of a
    log-uniform draw; ``min_horizon`` defaults to ``truncation``, as in the estimator). None when
    the config names no horizon or an unknown schedule.

    It is the "in distribution" length of a run for a checkpoint meta-trained on episodes of
    varied length (``l2o-eval horizon=checkpoint``)."""
    horizon = estimator_config.get("horizon")
    if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1:
        return None
    schedule = estimator_config.get("horizon_schedule") or "constant"
    if schedule == "constant":
        return horizon
    if schedule != "log_uniform":
        return None
    shortest = estimator_config.get("min_horizon") or estimator_config.get("truncation")
    if not isinstance(shortest, int) or isinstance(shortest, bool) or not 1 <= shortest <= horizon:
        return None
    return round(math.sqrt(shortest * horizon))


def _finite_mean(values: Tensor) -> float:
    """Mean of the finite entries (a diverged member is reported, not averaged in)."""
    kept = values[torch.isfinite(values)]
    return float(kept.mean()) if len(kept) else math.nan


def _draw_seeds(generator: torch.Generator, n: int) -> Tensor:
    return torch.randint(0, _SEED_HIGH, (n,), generator=generator, device=generator.device)


class TruncatedEstimator(GradientEstimator):
    """Episodes, task sampling, state and metrics shared by the truncated estimators.

    Args:
        lopt: the learned optimizer (``lopt.rule(meta_params)`` is the inner update rule).
        task: a fixed :class:`Task`, or a :class:`TaskFamily` sampled once per episode.
        population: P, inner trainings run side by side (ES/PES: particles, an even number).
        truncation: K, inner steps per estimate.
        horizon: T, inner steps per episode (the maximum, for ``log_uniform``).
        meta_loss: a name from :data:`l2o.meta.losses.META_LOSSES`.
        device: where the inner training's tensors live.
        horizon_schedule: "constant" (every episode has T steps) or "log_uniform" (T drawn
            log-uniformly from ``[min_horizon, horizon]`` per episode, so the learned optimizer
            sees short and long trainings).
        min_horizon: the shortest ``log_uniform`` episode (default: ``truncation``).
        update_schedule: a factor on every update over the episode's length, a name from
            :data:`l2o.optim.schedules.RUN_ANNEALINGS` (``constant``: none; ``cosine``: from
            1 to 0 at the episode's end). A checkpoint meta-trained with one is deployed with
            it over the user's run length (``LearnedOptimizer(total_steps=...)``, ``l2o-eval``).
        truncation_weighting: how much each truncation's estimate counts by where it lies in
            its episode (:func:`truncation_weight`): ``uniform``, or ``linear`` / ``quadratic``
            to weigh the episode's end more.
        compile: compile the inner steps (``l2o.meta.unroll``): ES and PES run every
            truncation as one ``torch.compile``d graph, a scan over its inner steps; TBPTT
            compiles each inner step with its backward. The first truncation of each task
            structure pays the compilation (tens of seconds to minutes on a CPU).
    """

    name: ClassVar[str] = "truncated"
    #: Meta-parameter perturbation pairs share a task instance; population must be even.
    antithetic: ClassVar[bool] = False

    def __init__(
        self,
        lopt: LOpt,
        task: Task | TaskFamily,
        *,
        population: int = 8,
        truncation: int = 20,
        horizon: int = 100,
        meta_loss: str = "train_mean",
        device: torch.device | str = "cpu",
        horizon_schedule: str = "constant",
        min_horizon: int | None = None,
        update_schedule: str = "constant",
        truncation_weighting: str = "uniform",
        compile: bool = False,
    ) -> None:
        self.compile = boolean("compile", compile)
        self.population = positive_int("population", population)
        self.truncation = positive_int("truncation", truncation)
        self.horizon = positive_int("horizon", horizon)
        if self.truncation > self.horizon:
            raise ValueError(
                f"truncation (K={truncation}) must be <= horizon (T={horizon}): "
                "a truncation never crosses an episode's end"
            )
        if self.antithetic and self.population % 2:
            raise ValueError(
                f"population must be even for {type(self).__name__} (antithetic pairs), "
                f"got {population}"
            )
        if horizon_schedule not in HORIZON_SCHEDULES:
            raise ValueError(
                f"horizon_schedule must be one of {HORIZON_SCHEDULES}, got {horizon_schedule!r}"
            )
        self.horizon_schedule = horizon_schedule
        self.min_horizon = positive_int(
            "min_horizon", self.truncation if min_horizon is None else min_horizon
        )
        if self.min_horizon > self.horizon:
            raise ValueError(
                f"min_horizon ({self.min_horizon}) must be <= horizon (T={self.horizon})"
            )
        self.update_schedule = check_update_schedule(update_schedule)
        self.truncation_weighting = check_truncation_weighting(truncation_weighting)
        try:
            self.meta_loss = get_meta_loss(meta_loss)
        except ValueError as err:
            raise ValueError(f"meta_loss: {err}") from None
        self.lopt = lopt
        self.device = torch.device(device)
        if isinstance(task, TaskFamily):
            self.family: TaskFamily | None = task
            self._fixed_task: Task | None = None
        elif isinstance(task, Task):
            self.family, self._fixed_task = None, task.to(self.device)
        else:
            raise TypeError(f"task must be a Task or a TaskFamily, got {type(task).__name__}")
        self._tasks: OrderedDict[int, Task] = OrderedDict()

    # -- what subclasses decide --------------------------------------------------------------

    @property
    def num_instances(self) -> int:
        """Distinct task instances (seeds) per episode."""
        return self.population // 2 if self.antithetic else self.population

    def _carried_seeds(self, seeds: Tensor) -> Tensor:
        """The instance seed of every inner state the estimator carries between truncations."""
        return seeds

    def _episode_extras(self, meta_params: Params) -> EstimatorState:
        """Per-episode state besides the carry (PES: its perturbation accumulators)."""
        return {}

    def _bad_instances(self, member_bad: Tensor) -> Tensor:
        """``[num_instances]``: instances with a non-finite member in the unroll."""
        return member_bad

    def _carry_rows(self, instances: Tensor) -> Tensor:
        """Rows of the carry that hold ``instances``, in ``init_carry``'s order for them."""
        return instances

    def _reset_extras(self, state: EstimatorState, instances: Tensor) -> EstimatorState:
        """Per-instance extras of restarted instances (PES: zero their accumulators)."""
        return {}

    @abstractmethod
    def _truncation(
        self,
        meta_params: Params,
        state: EstimatorState,
        task: Task,
        num_steps: int,
        generator: torch.Generator,
    ) -> tuple[Params, EstimatorState, Unroll, Tensor]:
        """Unroll ``num_steps`` from ``state``; return the gradient estimate, the state entries
        that changed (at least "carry"), the unroll and the per-member meta-losses."""

    # -- episodes ------------------------------------------------------------------------------

    def task_for(self, task_seed: int) -> Task:
        """The task of an episode: the fixed task, or ``family.sample(task_seed)`` (cached)."""
        if self.family is None:
            return self._fixed_task
        task = self._tasks.pop(task_seed, None)
        if task is None:
            task = self.family.sample(task_seed).to(self.device)
        self._tasks[task_seed] = task
        while len(self._tasks) > _TASK_CACHE_SIZE:
            self._tasks.popitem(last=False)
        return task

    def _draw_horizon(self, generator: torch.Generator) -> int:
        if self.horizon_schedule == "constant":
            return self.horizon
        drawn = round(log_uniform(generator, self.min_horizon, self.horizon))
        return min(self.horizon, max(self.min_horizon, drawn))

    def _annealing(self, state: EstimatorState) -> Schedule | None:
        """The factor on the updates of ``state``'s episode (None: constant)."""
        return run_annealing(self.update_schedule, int(state["horizon"]))

    def _start_episode(
        self, meta_params: Params, episode: int, generator: torch.Generator
    ) -> EstimatorState:
        task_seed = int(_draw_seeds(generator, 1)) if self.family is not None else -1
        horizon = self._draw_horizon(generator)
        seeds = _draw_seeds(generator, self.num_instances)
        task = self.task_for(task_seed)
        # The rule's initial state is treated as a constant (learned rules start from zeros).
        with torch.no_grad():
            rule = self.lopt.rule({k: v.detach() for k, v in meta_params.items()})
            carry = init_carry(rule, task, self._carried_seeds(seeds), device=self.device)
        return {
            "carry": carry,
            "episode": episode,
            "truncation": 0,
            "episode_step": 0,
            "horizon": horizon,
            "task_seed": task_seed,
            **self._episode_extras(meta_params),
        }

    def _restart_instances(
        self,
        meta_params: Params,
        state: EstimatorState,
        instances: Tensor,
        task: Task,
        generator: torch.Generator,
    ) -> EstimatorState:
        """``state`` with ``instances`` on fresh seeds at step 0 of the same task."""
        seeds = _draw_seeds(generator, len(instances))
        with torch.no_grad():
            rule = self.lopt.rule({k: v.detach() for k, v in meta_params.items()})
            fresh = init_carry(rule, task, self._carried_seeds(seeds), device=self.device)
        rows = self._carry_rows(instances.to(self.device))
        carry = tree_map(
            lambda old, new: old.index_copy(0, rows, new.to(old.dtype)), state["carry"], fresh
        )
        return {**state, "carry": carry, **self._reset_extras(state, instances)}

    # -- the GradientEstimator interface -------------------------------------------------------

    def init(self, meta_params: Params, generator: torch.Generator) -> EstimatorState:
        """Start the population's first episode."""
        return self._start_episode(meta_params, 0, generator)

    def estimate(
        self, meta_params: Params, state: EstimatorState, generator: torch.Generator
    ) -> Estimate:
        """Advance one truncation; see the module docstring for what each estimator returns.

        Metrics: ``meta_loss`` (population mean), ``inner_loss`` (mean training loss after the
        truncation's last update), ``nonfinite`` (NaN/inf inner losses; the meta-gradient is
        then non-finite too, and the episode restarts), ``inner_steps`` (task-steps, P x K),
        ``truncation`` (index within the episode), ``episode``, ``horizon``,
        ``episode_progress`` (fraction of the episode done), ``episode_done`` and
        ``truncation_weight`` (the factor on this estimate, :func:`truncation_weight`).
        """
        task = self.task_for(state["task_seed"])
        done = int(state["episode_step"])
        horizon = int(state["horizon"])
        num_steps = min(self.truncation, horizon - done)
        if num_steps < 1:
            raise ValueError(
                f"estimator state is past its episode's end (step {done} of {horizon})"
            )

        grads, changed, result, meta_losses = self._truncation(
            meta_params, state, task, num_steps, generator
        )
        weight = truncation_weight(self.truncation_weighting, done, num_steps, horizon)
        if weight != 1.0:
            grads = {k: g * weight for k, g in grads.items()}
        finite = finite_losses(result)
        nonfinite = int((~finite).sum())
        bad = self._bad_instances(~finite.all(dim=0))
        episode_done = done + num_steps >= horizon
        metrics = {
            "meta_loss": _finite_mean(meta_losses),
            "inner_loss": _finite_mean(result.terms.train[-1].detach()),
            "nonfinite": float(nonfinite),
            "member_resets": float(bad.sum()) if not episode_done else 0.0,
            "inner_steps": float(result.losses.numel()),
            "truncation": float(state["truncation"]),
            "episode": float(state["episode"]),
            "horizon": float(horizon),
            "episode_progress": (done + num_steps) / horizon,
            "episode_done": float(episode_done),
            "truncation_weight": weight,
        }
        if episode_done:
            new_state = self._start_episode(meta_params, int(state["episode"]) + 1, generator)
        else:
            new_state = {
                **state,
                **changed,
                "truncation": int(state["truncation"]) + 1,
                "episode_step": done + num_steps,
            }
            if bool(bad.any()):
                instances = torch.nonzero(bad).reshape(-1).cpu()
                new_state = self._restart_instances(
                    meta_params, new_state, instances, task, generator
                )
        grads = {k: g.to(meta_params[k]) for k, g in grads.items()}
        return Estimate(grads, new_state, metrics)


class TruncatedBPTT(TruncatedEstimator):
    """Truncated backpropagation through time: autograd through each K-step unroll.

    Args (besides :class:`TruncatedEstimator`'s):
        checkpoint: recompute inner steps' activations in the backward pass
            (``torch.utils.checkpoint``) to bound memory for large inner networks.
    """

    name: ClassVar[str] = "tbptt"

    def __init__(self, lopt: LOpt, task: Task | TaskFamily, *, checkpoint: bool = False, **kwargs):
        super().__init__(lopt, task, **kwargs)
        self.checkpoint = boolean("checkpoint", checkpoint)
        if self.checkpoint and self.compile:
            raise ValueError(
                "checkpoint and compile cannot both be set: a compiled step keeps its "
                "activations (set estimator.compile=false to checkpoint them)"
            )

    def _truncation(self, meta_params, state, task, num_steps, generator):
        meta = {k: v.detach().requires_grad_(True) for k, v in meta_params.items()}
        with torch.enable_grad():
            result = unroll(
                self.lopt.rule(meta),
                task,
                state["carry"],
                num_steps,
                eval_mode=self.meta_loss.eval_mode,
                checkpoint=self.checkpoint,
                compile=self.compile,
                update_schedule=self._annealing(state),
            )
            meta_losses = self.meta_loss(result.terms)
            # A diverged member is masked out (it restarts); the others' mean is the objective.
            finite = torch.isfinite(meta_losses.detach())
            kept = torch.where(finite, meta_losses, torch.zeros_like(meta_losses))
            # With every member diverged, the objective is NaN: the trainer skips the step.
            objective = kept.sum() / finite.sum() if bool(finite.any()) else meta_losses.sum()
            if objective.requires_grad:
                found = torch.autograd.grad(objective, list(meta.values()), allow_unused=True)
            else:  # the meta-loss does not depend on the meta-parameters at all
                found = [None] * len(meta)
        grads = {
            k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(meta.items(), found)
        }
        carry = detach_carry(result.carry)
        return grads, {"carry": carry}, result._replace(carry=carry), meta_losses.detach()


class ES(TruncatedEstimator):
    """Antithetic evolution strategies over each truncation (see the module docstring).

    Args (besides :class:`TruncatedEstimator`'s):
        sigma: standard deviation of the meta-parameter perturbations.
    """

    name: ClassVar[str] = "es"
    antithetic: ClassVar[bool] = True

    def __init__(
        self,
        lopt: LOpt,
        task: Task | TaskFamily,
        *,
        sigma: float = 0.01,
        **kwargs,
    ):
        super().__init__(lopt, task, **kwargs)
        self.sigma = float(sigma)
        check_hyperparameter("sigma", self.sigma, low=0.0, low_inclusive=False)

    @property
    def pairs(self) -> int:
        return self.population // 2

    def _bad_instances(self, member_bad: Tensor) -> Tensor:
        return member_bad[: self.pairs] | member_bad[self.pairs :]

    def _perturbations(self, meta_params: Params, generator: torch.Generator) -> Params:
        return {
            k: torch.randn(
                (self.pairs, *v.shape), generator=generator, device=generator.device, dtype=v.dtype
            ).to(self.device)
            for k, v in meta_params.items()
        }

    def _antithetic_unroll(
        self,
        meta_params: Params,
        eps: Params,
        task: Task,
        carry,
        num_steps: int,
        annealing: Schedule | None,
    ) -> tuple[Unroll, Tensor]:
        """Pair ``i``: member ``i`` runs ``theta + sigma eps_i``, ``pairs + i`` the minus side."""
        population_meta = {
            k: torch.cat([v + self.sigma * eps[k], v - self.sigma * eps[k]])
            for k, v in meta_params.items()
        }
        result = unroll(
            self.lopt.rule,
            task,
            carry,
            num_steps,
            population_meta_params=population_meta,
            eval_mode=self.meta_loss.eval_mode,
            compile=self.compile,
            update_schedule=annealing,
        )
        return result, self.meta_loss(result.terms)

    def _antithetic_grads(self, meta_losses: Tensor, directions: Params) -> Params:
        """``sum_i (L_i^+ - L_i^-) d_i / (2 sigma N)`` for directions ``d`` ([N, ...] each)."""
        diff = meta_losses[: self.pairs] - meta_losses[self.pairs :]
        # A pair with a diverged member is left out (it restarts), the rest averaged.
        finite = torch.isfinite(diff)
        if not bool(finite.any()):  # nothing to learn from: a non-finite estimate (skipped)
            return {k: torch.full_like(d[0], math.nan) for k, d in directions.items()}
        diff = torch.where(finite, diff, torch.zeros_like(diff))
        scale = 2.0 * self.sigma * int(finite.sum())
        return {
            k: torch.tensordot(diff.to(d.dtype), d, dims=1) / scale for k, d in directions.items()
        }

    def _truncation(self, meta_params, state, task, num_steps, generator):
        with torch.no_grad():
            eps = self._perturbations(meta_params, generator)
            both = tree_map_only(Tensor, lambda t: torch.cat([t, t]), state["carry"])
            result, meta_losses = self._antithetic_unroll(
                meta_params, eps, task, both, num_steps, self._annealing(state)
            )
            grads = self._antithetic_grads(meta_losses, eps)
        # Each pair goes on from its positive member's state: a trajectory under theta + sigma
        # eps, eps symmetric, so on average it is the unperturbed trajectory.
        carry = tree_map_only(Tensor, lambda t: t[: self.pairs], result.carry)
        return grads, {"carry": carry}, result, meta_losses


class PES(ES):
    """Persistent evolution strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021).

    Args: as :class:`ES`. Each of the ``population`` particles carries its own inner state;
    ``state["accumulator"]`` holds each pair's perturbation sum ``xi`` (``{name: [N, ...]}``),
    reset to zero when an episode starts.
    """

    name: ClassVar[str] = "pes"

    def _carried_seeds(self, seeds: Tensor) -> Tensor:
        return torch.cat([seeds, seeds])

    def _carry_rows(self, instances: Tensor) -> Tensor:
        return torch.cat([instances, instances + self.pairs])

    def _reset_extras(self, state: EstimatorState, instances: Tensor) -> EstimatorState:
        rows = instances.to(self.device)
        accumulator = {k: a.index_fill(0, rows, 0.0) for k, a in state["accumulator"].items()}
        return {"accumulator": accumulator}

    def _episode_extras(self, meta_params: Params) -> EstimatorState:
        zeros = {
            k: torch.zeros((self.pairs, *v.shape), dtype=v.dtype, device=self.device)
            for k, v in meta_params.items()
        }
        return {"accumulator": zeros}

    def _truncation(self, meta_params, state, task, num_steps, generator):
        with torch.no_grad():
            eps = self._perturbations(meta_params, generator)
            xi = {k: a + eps[k] for k, a in state["accumulator"].items()}
            result, meta_losses = self._antithetic_unroll(
                meta_params, eps, task, state["carry"], num_steps, self._annealing(state)
            )
            grads = self._antithetic_grads(meta_losses, xi)
        return grads, {"carry": result.carry, "accumulator": xi}, result, meta_losses


ESTIMATORS: Registry[type[TruncatedEstimator]] = Registry("estimator")
for _cls in (TruncatedBPTT, ES, PES):
    ESTIMATORS.register(_cls.name, _cls)


def get_estimator(name: str, **kwargs: Any) -> TruncatedEstimator:
    """Build the estimator registered as ``name`` ("tbptt", "es", "pes") from ``kwargs``."""
    return ESTIMATORS[name](**kwargs)
