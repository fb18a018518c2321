"""What a result was made with: versions, time, machine, device and code version.

One builder for every card l2o writes (checkpoints, meta-training runs, evaluation reports)::

    provenance()                  # versions, UTC time, machine (and GPU when there is one)
    provenance(torch.device(...)) # ... plus the device and its name, and the git commit
"""

from __future__ import annotations

import functools
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["git_commit", "provenance"]


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """Versions and creation time; with ``device``, also that device, its name and the git
    commit of the checkout l2o runs from (when it runs from one)."""
    from l2o import __version__

    hardware = platform.machine() or "unknown"
    if torch.cuda.is_available():
        hardware = f"{hardware}, {torch.cuda.get_device_name()}"
    out: dict[str, Any] = {
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch_version": torch.__version__,
        "l2o_version": __version__,
        "python_version": platform.python_version(),
        "hardware": hardware,
    }
    if device is None:
        return out
    device = torch.device(device)
    out["device"] = str(device)
    out["device_name"] = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    )
    commit = git_commit()
    if commit:
        out["git_commit"] = commit
    return out


@functools.cache
def git_commit() -> str | None:
    """HEAD of the checkout l2o runs from (``"<sha>-dirty"`` with uncommitted changes to tracked
    files), cached: asked once per process, so a commit made while a long run goes on is not
    mistaken for the code that run is executing."""

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(
                ["git", *args],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    return commit + "-dirty" if git("status", "--porcelain", "--untracked-files=no") else commit


def _cpu_name() -> str:
    return platform.processor() or platform.machine() or "cpu"
