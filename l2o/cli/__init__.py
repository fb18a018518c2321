"""Console entry points: ``l2o-meta-train`` (:mod:`l2o.cli.meta_train`) and ``l2o-eval``
(:mod:`l2o.cli.eval`)."""

from __future__ import annotations

import logging
from pathlib import Path


def log_to_file(logger: logging.Logger, path: Path) -> logging.Handler:
    """Send ``logger``'s INFO records to ``path`` (its folder created); returns the handler, for
    ``logger.removeHandler`` and ``close`` when the command ends."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler
