"""The gradient-estimator contract used by the meta-trainer.

An estimator owns the inner training of a population of tasks under the learned rule (a
truncated unroll), and turns one truncation into an estimate of d(meta-loss)/d(meta_params):

    est_state          = estimator.init(meta_params, generator)
    result             = estimator.estimate(meta_params, est_state, generator)
    meta_grads, est_state, metrics = result.grads, result.state, result.metrics

``EstimatorState`` is a dict of tensors, numbers, strings and nested dicts of them, so that it
saves with ``torch.save`` and loads with ``torch.load(weights_only=True)``; restoring it (and the
generator state) resumes meta-training exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from l2o.optim.base import Params

EstimatorState = dict[str, Any]


@dataclass
class Estimate:
    grads: Params
    state: EstimatorState
    #: Scalars for logging: "meta_loss", "inner_loss", ... (floats).
    metrics: dict[str, float] = field(default_factory=dict)


class GradientEstimator(ABC):
    name: str = "estimator"

    @abstractmethod
    def init(self, meta_params: Params, generator: torch.Generator) -> EstimatorState:
        """Start the population's first episodes."""

    @abstractmethod
    def estimate(
        self, meta_params: Params, state: EstimatorState, generator: torch.Generator
    ) -> Estimate:
        """Advance one truncation and return the meta-gradient estimate."""
