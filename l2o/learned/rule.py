"""What every learned optimizer's update rule holds: its architecture, meta-parameters and lr."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

import torch

from l2o.learned.base import LOpt
from l2o.learned.mlp_fused import CHUNK_SIZE
from l2o.optim.base import (
    LearningRate,
    LossFn,
    Params,
    State,
    Step,
    UpdateRule,
    check_hyperparameter,
)


@dataclasses.dataclass(frozen=True)
class LearnedRule(UpdateRule):
    """Base of the rules returned by ``lopt.rule(meta_params)``.

    ``meta_params`` are held by reference (never copied or detached), so meta-gradients flow
    through :meth:`update`. Only ``lr`` is a hyper-parameter: the ``torch.optim`` adapter puts it
    in the param groups, and schedulers scale it; the architecture and its meta-parameters are
    fixed for the rule's lifetime.
    """

    lopt: LOpt = dataclasses.field(repr=False)
    meta_params: Params = dataclasses.field(repr=False, compare=False)
    lr: LearningRate = 1.0

    def __post_init__(self) -> None:
        check_hyperparameter("lr", self.lr)

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        return ("lr",)


@dataclasses.dataclass(frozen=True)
class BlockedLearnedRule(LearnedRule):
    """A learned rule with two computations of each tensor's update: a reference that
    materialises the tensor's whole per-coordinate input matrix (the oracle), and a fused one
    in blocks of about ``chunk_size`` coordinates that keeps what a block touches in cache.
    Both are pure, so the choice holds inside unrolls too; they agree to float32 rounding.

    Subclasses implement :meth:`_update` with ``fused_above``: tensors of more coordinates
    take the fused path (``None``: none do)."""

    #: Tensors larger than this take the fused path in blocks of about this many coordinates
    #: (an implementation setting, not a hyper-parameter: it changes only rounding).
    chunk_size: int = dataclasses.field(default=CHUNK_SIZE, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.chunk_size!r}")

    def update(
        self,
        grads: Params,
        state: State,
        params: Params,
        *,
        step: Step,
        loss_fn: LossFn | None = None,
    ) -> tuple[Params, State]:
        """The learned step: a tensor of more than ``chunk_size`` coordinates through the fused
        computation, a smaller one through the reference (fewer ops, all of it in cache
        anyway); the same update to float32 rounding, under vmap and autograd as well.

        Inside a graph being compiled (``torch.compile``, e.g. the meta-training unrolls'
        compiled truncations) every tensor takes the fused computation: Inductor turns its
        feature-major layout (``[features, n]``, ``Wᵀ x`` products) into whole-vector loops and
        faster batched products. Measured on the default recipe's task mixture: its compiled
        forward truncations 1.36-1.9x faster (BENCHMARKS.md). (``OrthoMLPRule`` makes one
        exception: in a compiled graph differentiated with respect to its meta-parameters it
        traces its scalar-weighted form instead; see its ``_coordinates_function``.)"""
        fused_above = 0 if torch.compiler.is_compiling() else self.chunk_size
        return self._update(grads, state, params, step, fused_above=fused_above)

    def reference_update(
        self, grads: Params, state: State, params: Params, *, step: Step
    ) -> tuple[Params, State]:
        """The oracle: every tensor's input matrix materialised whole."""
        return self._update(grads, state, params, step, fused_above=None)

    def fused_update(
        self, grads: Params, state: State, params: Params, *, step: Step
    ) -> tuple[Params, State]:
        """Every tensor through the fused computation, whatever its size."""
        return self._update(grads, state, params, step, fused_above=0)

    @abstractmethod
    def _update(
        self, grads: Params, state: State, params: Params, step: Step, fused_above: int | None
    ) -> tuple[Params, State]:
        """The update with tensors of more than ``fused_above`` coordinates fused."""
