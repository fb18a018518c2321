"""l2o: learned optimizers in PyTorch.

- ``l2o.GuardedLearnedOptimizer`` / ``l2o.LearnedOptimizer``: drop-in ``torch.optim`` classes
  running a meta-trained learned optimizer (guarded by a hand-designed fallback, LGL2O);
- ``l2o.optim``: hand-designed optimizers as pure update rules and ``torch.optim`` classes;
- ``l2o.tasks``, ``l2o.learned``, ``l2o.meta``: tasks, learned-optimizer architectures and the
  ``torch.func`` meta-training engine behind ``l2o-meta-train``.
"""

__version__ = "0.1.0"

from l2o.guard import GuardedLearnedOptimizer, GuardRule
from l2o.learned.optimizer import LearnedOptimizer

__all__ = ["GuardRule", "GuardedLearnedOptimizer", "LearnedOptimizer", "__version__"]
