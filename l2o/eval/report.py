"""What ``l2o-eval`` writes: ``results.json``, ``results.csv``, ``summary.md`` and PNG plots.

``results.json`` holds everything the tables are computed from (per-seed scores of every
optimizer on every task); non-finite numbers are written as the strings ``"inf"``, ``"-inf"``
and ``"nan"`` (JSON has no such numbers; ``float("inf")`` reads them back). Tables format every
number with :func:`fmt`, so a table entry can be checked against the JSON.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from l2o import durable

__all__ = [
    "CSV_COLUMNS",
    "fmt",
    "plot_acceptance",
    "plot_curves",
    "plot_speedups",
    "summary_markdown",
    "write_outputs",
]

CSV_COLUMNS = (
    "suite",
    "task",
    "optimizer",
    "kind",
    "lr",
    "final_loss",
    "best_loss",
    "eval_loss",
    "speedup",
    "normalized_loss",
    "steps_to_reference",
    "diverged",
    "seeds",
    "horizon",
    "ms_per_step",
    "final_acceptance",
)


def fmt(value: Any) -> str:
    """A number as the tables show it: 4 significant digits; "—" for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _final_acceptance(row: Mapping[str, Any]) -> float | None:
    acceptance = row.get("acceptance")
    return float(acceptance[-1][1]) if acceptance else None


def csv_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (suite, task, optimizer)."""
    rows = []
    for suite, body in results["suites"].items():
        for task, entry in body["tasks"].items():
            for name, r in entry["optimizers"].items():
                rows.append(
                    {
                        "suite": suite,
                        "task": task,
                        "optimizer": name,
                        "kind": r["kind"],
                        "lr": r["lr"],
                        "final_loss": r["final_loss"],
                        "best_loss": r["best_loss"],
                        "eval_loss": r["eval_loss"],
                        "speedup": r["speedup"],
                        "normalized_loss": r["normalized_loss"],
                        "steps_to_reference": r["steps_to_reference"],
                        "diverged": r["diverged"],
                        "seeds": len(r["seeds"]),
                        "horizon": entry["horizon"],
                        "ms_per_step": r["ms_per_step"],
                        "final_acceptance": _final_acceptance(r),
                    }
                )
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return lines


def _interval(ci: Sequence[float]) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


AGGREGATE_HEADER = (
    "optimizer",
    "IQM speed-up",
    "95% CI",
    "IQM normalised loss",
    "95% CI",
    "win rate",
    "diverged seeds",
    "tasks",
)


def _aggregate_rows(aggregate: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    return [
        [
            name,
            a["iqm_speedup"],
            _interval(a["speedup_ci"]),
            a["iqm_normalized_loss"],
            _interval(a["normalized_loss_ci"]),
            a["win_rate"],
            f"{a['diverged_seeds']}/{a['seeds']}",
            a["tasks"],
        ]
        for name, a in aggregate.items()
    ]


TASK_HEADER = (
    "task",
    "optimizer",
    "lr",
    "final loss",
    "best loss",
    "held-out loss",
    "speed-up",
    "normalised loss",
    "diverged",
    "ms/step",
    "acceptance",
)


def summary_markdown(results: Mapping[str, Any]) -> str:
    """The tables: per suite an aggregate table and a per-task table; the OOD aggregate."""
    reference = results["reference"]
    lines = [
        "# l2o-eval summary",
        "",
        f"Reference: tuned `{reference}`. Speed-up: steps the reference needs for a loss / steps "
        "the optimizer needs for it (> 1 is faster); normalised loss: final training loss / the "
        "reference's (< 1 is lower). IQM over all tasks' seeds, 95% stratified-bootstrap "
        "intervals; win rate: share of tasks with a lower final loss than the reference. "
        "Per task: means over seeds; lr is the tuned learning rate (a guard's: its fallback's); "
        "ms/step is wall time per step of one instance; acceptance is the share of the last "
        "steps that took the learned update. Definitions: `l2o/eval/metrics.py`.",
        "",
    ]
    meta = results.get("meta", {})
    if meta:
        lines += [
            f"Machine: {meta.get('machine', '?')}; device: {meta.get('device', '?')}; "
            f"{meta.get('date', '')}; wall time {fmt(meta.get('wall_s'))} s.",
            "",
        ]
    if "ood" in results:
        lines += ["## All out-of-distribution suites", ""]
        lines += [f"Suites: {', '.join(results['ood']['suites'])}.", ""]
        lines += [*_table(AGGREGATE_HEADER, _aggregate_rows(results["ood"]["aggregate"])), ""]
    for suite, body in results["suites"].items():
        lines += [f"## {suite}", ""]
        lines += [*_table(AGGREGATE_HEADER, _aggregate_rows(body["aggregate"])), ""]
        rows, edges = [], []
        for task, entry in body["tasks"].items():
            for name, r in entry["optimizers"].items():
                rows.append(
                    [
                        f"{task} ({entry['horizon']} steps)",
                        name,
                        r["lr"],
                        r["final_loss"],
                        r["best_loss"],
                        r["eval_loss"],
                        r["speedup"],
                        r["normalized_loss"],
                        f"{r['diverged']}/{len(r['seeds'])}",
                        r["ms_per_step"],
                        _final_acceptance(r),
                    ]
                )
                if r.get("tuning") and r["tuning"].get("at_edge") and name not in edges:
                    edges.append(f"{name} on {task}")
        lines += [*_table(TASK_HEADER, rows), ""]
        if edges:
            lines += [
                "Tuned learning rate at the edge of the grid (widen `tuning.grid`): "
                + "; ".join(edges)
                + ".",
                "",
            ]
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return durable.write_bytes(path, buffer.getvalue())


def _grid(n: int):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    return rows, cols


def _nan(values: Sequence[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def plot_curves(suite: str, body: Mapping[str, Any], path: Path) -> Path:
    """Per task, every optimizer's smoothed training loss: median over seeds, min-max band."""
    plt = _pyplot()
    tasks = body["tasks"]
    rows, cols = _grid(len(tasks))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (task, entry) in zip(axes.flat, tasks.items()):
        for name, r in entry["optimizers"].items():
            c = r["curve"]
            (line,) = ax.plot(c["steps"], _nan(c["median"]), label=name, lw=1.4)
            ax.fill_between(
                c["steps"], _nan(c["low"]), _nan(c["high"]), color=line.get_color(), alpha=0.15
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{task} ({entry['horizon']} steps)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (smoothed)")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(tasks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{suite}: median over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_speedups(results: Mapping[str, Any], path: Path) -> Path:
    """IQM speed-up over the reference per suite (and all OOD suites), with 95% intervals."""
    plt = _pyplot()
    groups = {suite: body["aggregate"] for suite, body in results["suites"].items()}
    if "ood" in results:
        groups["all OOD"] = results["ood"]["aggregate"]
    names = list(results["optimizers"])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.1 * len(groups))), 4))
    for i, name in enumerate(names):
        xs, ys, lows, highs = [], [], [], []
        for g, aggregate in enumerate(groups.values()):
            a = aggregate[name]
            y = a["iqm_speedup"]
            low, high = a["speedup_ci"]
            xs.append(g + (i - (len(names) - 1) / 2) * width)
            ys.append(y)
            # A percentile interval need not contain the estimate (rounding, or a skewed
            # bootstrap distribution): an error bar cannot reach past it.
            finite = math.isfinite(y)
            lows.append(max(0.0, y - low) if finite and math.isfinite(low) else 0.0)
            highs.append(max(0.0, high - y) if finite and math.isfinite(high) else 0.0)
        ax.bar(xs, ys, width=width, label=name, yerr=[lows, highs], capsize=2)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"IQM speed-up over tuned {results['reference']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_acceptance(suite: str, body: Mapping[str, Any], path: Path) -> Path | None:
    """Share of steps that took the learned update, over training, for every guarded run."""
    plt = _pyplot()
    series = [
        (task, name, r["acceptance"])
        for task, entry in body["tasks"].items()
        for name, r in entry["optimizers"].items()
        if r.get("acceptance")
    ]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for task, name, acceptance in series:
        ax.plot([a[0] for a in acceptance], [a[1] for a in acceptance], label=f"{task}: {name}")
    ax.set_xlabel("step")
    ax.set_ylabel("learned update accepted")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{suite}: guard acceptance (mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    return _save(plt, fig, path)


def write_outputs(results: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write every output into ``run_dir``; returns ``{"files": [...], "tables": {...},
    "images": {...}}`` (tables as (columns, rows) for W&B)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(results), indent=1, allow_nan=False)
    files = [durable.write_bytes(run_dir / "results.json", text.encode("utf-8"))]
    rows = csv_rows(results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    files.append(durable.write_bytes(run_dir / "results.csv", buffer.getvalue().encode("utf-8")))
    files.append(
        durable.write_bytes(run_dir / "summary.md", summary_markdown(results).encode("utf-8"))
    )
    images = {"speedup": plot_speedups(results, run_dir / "speedup.png")}
    for suite, body in results["suites"].items():
        images[f"curves/{suite}"] = plot_curves(suite, body, run_dir / f"curves_{suite}.png")
        accepted = plot_acceptance(suite, body, run_dir / f"acceptance_{suite}.png")
        if accepted is not None:
            images[f"acceptance/{suite}"] = accepted
    files += list(images.values())
    tables = {"results": (list(CSV_COLUMNS), [[row[c] for c in CSV_COLUMNS] for row in rows])}
    aggregates = {f"aggregate/{s}": b["aggregate"] for s, b in results["suites"].items()}
    if "ood" in results:
        aggregates["aggregate/ood"] = results["ood"]["aggregate"]
    for name, aggregate in aggregates.items():
        tables[name] = (list(AGGREGATE_HEADER), _aggregate_rows(aggregate))
    return {"files": files, "tables": tables, "images": images}
