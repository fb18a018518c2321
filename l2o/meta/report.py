"""The report of a meta-training run, written beside its final checkpoint.

After held-out evaluation, ``l2o-meta-train`` records the result in the card of
``checkpoints/last`` (``card["eval"]``: it is not part of the checkpoint's identity) and writes
``last.md`` (a model card a person reads) and ``last.png`` (the meta-training curves).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from l2o import durable
from l2o.learned.checkpoint import checkpoint_paths, update_card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a (non-finite)" if not math.isfinite(value) else f"{value:.4g}"
    return "n/a" if value is None else str(value)


def plot_history(history: Sequence[Mapping[str, float]], path: str | os.PathLike) -> Path:
    """Meta-loss and inner loss per outer step (non-finite points left out), as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for key in ("meta_loss", "inner_loss"):
        points = [
            (row["step"], row[key])
            for row in history
            if isinstance(row.get(key), float) and math.isfinite(row[key])
        ]
        if points:
            ax.plot(*zip(*points), label=key, linewidth=1)
    ax.set_xlabel("outer step")
    ax.set_title("meta-training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    durable.write_with(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def write_report(
    base: str | os.PathLike,
    history: Sequence[Mapping[str, float]],
    evaluation: Mapping[str, Any] | None,
) -> dict:
    """Record ``evaluation`` in the card of the checkpoint at ``base`` and write
    ``<base>.md`` and ``<base>.png``; returns the updated card."""
    entries = {"eval": dict(evaluation)} if evaluation else {}
    card = update_card(base, entries)
    _, card_path = checkpoint_paths(base)
    stem = card_path.with_suffix("")
    plot = plot_history(history, stem.with_suffix(".png"))
    config = card.get("config", {})
    prov = card.get("provenance", {})
    estimator = dict(config.get("estimator", {}))
    estimator.setdefault("name", str(estimator.get("_target_", "?")).rpartition(".")[2])
    lines = [
        f"# Model card: `{stem.name}` ({card.get('id', '?')})",
        "",
        "Written by `l2o-meta-train` at the end of the run. Use it with "
        f'`l2o.GuardedLearnedOptimizer(params, checkpoint="{stem}")`.',
        "",
        f"- **Learned optimizer**: `{card['lopt']['name']}` {card['lopt']['config']}",
        f"- **Task**: `{config.get('task', {}).get('_target_', '?')}`",
        f"- **Estimator**: `{estimator.get('name', '?')}`, population "
        f"{estimator.get('population', '?')}, truncation {estimator.get('truncation', '?')}, "
        f"horizon {estimator.get('horizon', '?')}, meta-loss {estimator.get('meta_loss', '?')}",
        f"- **Outer steps**: {prov.get('outer_step', '?')} ({prov.get('skipped_nonfinite', 0)} "
        f"skipped as non-finite), {_fmt(prov.get('wall_time_s'))} s on "
        f"{prov.get('device_name', prov.get('device', '?'))}; seed {prov.get('seed', '?')}; "
        f"commit {prov.get('git_commit', 'unknown')}",
    ]
    if evaluation:
        lines += [
            "",
            "## Held-out result",
            "",
            f"Meta-loss `{evaluation.get('meta_loss')}` over {evaluation.get('seeds')} held-out "
            f"seeds × {evaluation.get('horizon')} inner steps: "
            f"**{_fmt(evaluation.get('before'))}** at initialisation → "
            f"**{_fmt(evaluation.get('after'))}** after meta-training.",
        ]
    lines += ["", f"![meta-training curves]({plot.name})", ""]
    durable.write_bytes(stem.with_suffix(".md"), "\n".join(lines).encode("utf-8"))
    return card
