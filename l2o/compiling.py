"""``torch.compile`` made on first use, the way l2o's compiled paths need it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def compile_quietly(fn: Callable, **kwargs: Any) -> Callable:
    """``torch.compile(fn, **kwargs)``, with the DeprecationWarnings torch raises about its own
    code while importing Dynamo and Inductor silenced: called on first use (so that ``import
    l2o`` does not pay about 1 s for those imports), it may run inside a caller's
    ``warnings.simplefilter("error")``, where they would be errors that are none of the
    caller's doing."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.compile(fn, **kwargs)
