"""Tasks (training problems), task families, suites and offline datasets."""

from l2o.tasks.augment import LossScaleTask, ReparamTask
from l2o.tasks.base import Batch, Task, TaskFamily
from l2o.tasks.families import (
    CharLMFamily,
    ConvNetFamily,
    MixtureFamily,
    MLPFamily,
    QuadraticFamily,
    family_names,
    get_family,
)
from l2o.tasks.language import CharLSTMTask, CharTransformerTask
from l2o.tasks.registry import get_task, register_task, task_names
from l2o.tasks.suites import Suite, SuiteEntry, get_suite, suite_names
from l2o.tasks.supervised import (
    AutoencoderTask,
    ConvNetTask,
    LogisticRegressionTask,
    MLPClassifierTask,
)
from l2o.tasks.synthetic import QuadraticTask, RosenbrockTask

__all__ = [
    "AutoencoderTask",
    "Batch",
    "CharLMFamily",
    "CharLSTMTask",
    "CharTransformerTask",
    "ConvNetFamily",
    "ConvNetTask",
    "LogisticRegressionTask",
    "LossScaleTask",
    "MLPClassifierTask",
    "MLPFamily",
    "MixtureFamily",
    "QuadraticFamily",
    "QuadraticTask",
    "ReparamTask",
    "RosenbrockTask",
    "Suite",
    "SuiteEntry",
    "Task",
    "TaskFamily",
    "family_names",
    "get_family",
    "get_suite",
    "get_task",
    "register_task",
    "suite_names",
    "task_names",
]
