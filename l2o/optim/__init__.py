"""Hand-designed optimizers: pure update rules, LR schedules and drop-in ``torch.optim`` classes.

- rules (:mod:`l2o.optim.rules`, :mod:`l2o.optim.lbfgs`): ``get("adam", lr=1e-3)`` or
  ``rules.Adam(lr=1e-3)``; pure ``init``/``update`` over dicts of tensors (see
  :mod:`l2o.optim.base`), for unrolls under ``torch.func``;
- classes: ``Adam(model.parameters(), lr=1e-3)``, ``get_class("adam")`` or
  ``RuleOptimizer(model.parameters(), rule)`` for any rule, as ``torch.optim`` optimizers;
- schedules (:mod:`l2o.optim.schedules`): pure functions of the step, usable as a rule's ``lr``.

The classes carry ``torch.optim``'s names (``l2o.optim.Adam`` is the optimizer class); the rules
of the same names live in :mod:`l2o.optim.rules`.
"""

from l2o.optim import (
    adafisher,
    curvature,
    gradient_free,
    lbfgs,
    line_search,
    muon,
    newton,
    quasi_newton,
    rules,
    schedules,
    wrappers,
)
from l2o.optim.adafisher import AdaFisherOptimizer as AdaFisher
from l2o.optim.adapter import RuleOptimizer
from l2o.optim.base import UpdateRule, apply_updates
from l2o.optim.curvature import AdaHessianOptimizer as AdaHessian
from l2o.optim.curvature import INNAOptimizer as INNA
from l2o.optim.curvature import SophiaOptimizer as Sophia
from l2o.optim.gradient_free import EvolutionStrategyOptimizer as EvolutionStrategy
from l2o.optim.gradient_free import RandomSearchOptimizer as RandomSearch
from l2o.optim.lbfgs import LBFGSOptimizer as LBFGS
from l2o.optim.newton import LevenbergMarquardtOptimizer as LevenbergMarquardt
from l2o.optim.newton import NewtonOptimizer as Newton
from l2o.optim.optimizers import (
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    AMSGrad,
    Muon,
    NAdam,
    RMSprop,
)
from l2o.optim.quasi_newton import BFGSOptimizer as BFGS
from l2o.optim.quasi_newton import ConjugateGradientOptimizer as ConjugateGradient
from l2o.optim.registry import get, get_class, names, register
from l2o.optim.wrappers import EntropySGDOptimizer as EntropySGD
from l2o.optim.wrappers import LookaheadOptimizer as Lookahead
from l2o.optim.wrappers import PerturbedGradientOptimizer as PerturbedGradient
from l2o.optim.wrappers import SAMOptimizer as SAM
from l2o.optim.wrappers import WeightAveragingOptimizer as WeightAveraging

__all__ = [
    "BFGS",
    "INNA",
    "LBFGS",
    "SAM",
    "SGD",
    "AMSGrad",
    "AdaFisher",
    "AdaHessian",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "ConjugateGradient",
    "EntropySGD",
    "EvolutionStrategy",
    "LevenbergMarquardt",
    "Lookahead",
    "Muon",
    "NAdam",
    "Newton",
    "PerturbedGradient",
    "RMSprop",
    "RandomSearch",
    "RuleOptimizer",
    "Sophia",
    "UpdateRule",
    "WeightAveraging",
    "adafisher",
    "apply_updates",
    "curvature",
    "get",
    "get_class",
    "gradient_free",
    "lbfgs",
    "line_search",
    "muon",
    "names",
    "newton",
    "quasi_newton",
    "register",
    "rules",
    "schedules",
    "wrappers",
]
