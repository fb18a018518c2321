"""What every learned optimizer's update rule holds: its architecture, meta-parameters and lr."""

from __future__ import annotations

import dataclasses

from l2o.learned.base import LOpt
from l2o.optim.base import LearningRate, Params, UpdateRule, check_hyperparameter


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
