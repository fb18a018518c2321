"""Tasks by name: ``get_task("mlp", width=64)``.

Built-in names are registered here; other modules add theirs with :func:`register_task`.
``get_task(**task.config())`` rebuilds a task from its recorded configuration.
"""

from __future__ import annotations

from typing import Any

from l2o.registry import Registry, unknown_keyword
from l2o.tasks.base import Task
from l2o.tasks.supervised import (
    AutoencoderTask,
    ConvNetTask,
    LogisticRegressionTask,
    MLPClassifierTask,
)
from l2o.tasks.synthetic import QuadraticTask, RosenbrockTask

_TASKS: Registry[type[Task]] = Registry("task")


def register_task(name: str, cls: type[Task]) -> None:
    """Make ``cls`` constructible as ``get_task(name, **kwargs)``.

    Re-registering the same class is a no-op; taking a name already used by another class is an
    error.
    """
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task({name!r}, ...) needs a Task subclass, got {cls!r}")
    _TASKS.register(name, cls)


def task_names() -> tuple[str, ...]:
    """Registered task names, sorted."""
    return _TASKS.names()


def get_task(name: str, **kwargs: Any) -> Task:
    """A new task ``name`` built with constructor arguments ``kwargs``.

    Unknown names and unknown arguments raise ``ValueError`` listing what is accepted.
    """
    cls = _TASKS[name]
    problem = unknown_keyword(cls, kwargs)
    if problem:
        raise ValueError(f"task {name!r} has {problem}")
    return cls(**kwargs)


for _cls in (
    QuadraticTask,
    RosenbrockTask,
    LogisticRegressionTask,
    MLPClassifierTask,
    ConvNetTask,
    AutoencoderTask,
):
    register_task(_cls.name, _cls)
