"""The learned-optimizer contract: a family of update rules indexed by meta-parameters.

    meta_params = lopt.init_meta(generator)     # dict of tensors, meta-trained
    rule        = lopt.rule(meta_params)        # an l2o.optim UpdateRule

Meta-gradients flow to ``meta_params`` through ``rule.update`` inside an unroll, so ``rule``
must close over ``meta_params`` without copying or detaching them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from l2o.optim.base import Params, UpdateRule


class LOpt(ABC):
    """Base class of learned-optimizer architectures (``configs/lopt/``)."""

    #: Registry name, also written into checkpoint cards.
    name: str = "lopt"

    @abstractmethod
    def init_meta(self, generator: torch.Generator) -> Params:
        """Initial meta-parameters."""

    @abstractmethod
    def rule(self, meta_params: Params) -> UpdateRule:
        """The update rule defined by ``meta_params``."""

    @abstractmethod
    def config(self) -> dict:
        """Constructor keyword arguments, JSON-serialisable, so a checkpoint rebuilds the lopt."""
