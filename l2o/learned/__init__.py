"""Learned optimizers: feature extraction, architectures, registry and checkpoint format."""

from l2o.learned.base import LOpt
from l2o.learned.checkpoint import (
    CheckpointError,
    checkpoint_id,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    shipped_checkpoints,
    shipped_names_of,
)
from l2o.learned.lstm_lopt import LSTMLOpt, LSTMRule
from l2o.learned.mlp_lopt import MLPLOpt, MLPRule
from l2o.learned.ortho_lopt import OrthoMLPLOpt, OrthoMLPRule
from l2o.learned.registry import get_lopt, lopt_names, register_lopt
from l2o.learned.rule import LearnedRule

__all__ = [
    "CheckpointError",
    "LOpt",
    "LSTMLOpt",
    "LSTMRule",
    "LearnedRule",
    "MLPLOpt",
    "MLPRule",
    "OrthoMLPLOpt",
    "OrthoMLPRule",
    "checkpoint_id",
    "get_lopt",
    "load_checkpoint",
    "lopt_names",
    "register_lopt",
    "resolve_checkpoint",
    "save_checkpoint",
    "shipped_checkpoints",
    "shipped_names_of",
]
