"""Evaluate a learned-optimizer checkpoint on held-out seeds of its meta-training family against
tuned Adam (and the LGL2O-guarded learned optimizer), as reported in the model cards.

    python scripts/evaluate_checkpoint.py --checkpoint checkpoints/default \
        --experiment mnist1d_mlp --seeds 16 --steps 200 --json out.json --plot out.png

The task family comes from the experiment's config in configs/ (trusted), never from the card.
Adam's learning rate is tuned on the same held-out seeds (which favours Adam). Definitions of
"final training loss" and "steps to reach" are in l2o/eval/curves.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from l2o.eval.curves import compare_with_tuned, training_curves, windowed_mean
from l2o.guard import GuardRule
from l2o.learned.checkpoint import checkpoint_id, load_checkpoint, resolve_checkpoint
from l2o.meta.configure import build, compose_config
from l2o.optim import registry
from l2o.tasks.suites import HELD_OUT_SEED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--experiment", default="mnist1d_mlp")
    parser.add_argument("--tasks", type=int, default=1, help="task structures sampled")
    parser.add_argument("--seeds", type=int, default=16, help="instance seeds per task")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    family = build(compose_config(f"experiment={args.experiment}"), torch.device("cpu"))["task"]
    lopt, meta_params, card = load_checkpoint(resolve_checkpoint(args.checkpoint))
    learned = lopt.rule(meta_params)

    rows = []
    start = time.time()
    for t in range(args.tasks):
        task = family.sample(HELD_OUT_SEED + t) if hasattr(family, "sample") else family
        seeds = [HELD_OUT_SEED + 1000 * t + i for i in range(args.seeds)]
        comparison = compare_with_tuned(learned, task, seeds, args.steps, window=args.window)
        adam = registry.get("adam", lr=comparison.baseline.lr)
        guarded = GuardRule(learned=learned, fallback=adam)
        guarded_curve = windowed_mean(
            training_curves(guarded, task, seeds, args.steps), args.window
        )
        rows.append(
            {
                "task": task.config(),
                "adam_lr": comparison.baseline.lr,
                "adam_grid": comparison.baseline.grid,
                "adam_final_loss": comparison.baseline.final_loss,
                "learned_final_loss": comparison.final_loss,
                "guarded_final_loss": float(guarded_curve[-1]),
                "learned_steps_to_adam_final": comparison.steps_to_baseline_final,
                "step_ratio": comparison.step_ratio,
                "curves": {
                    "adam": comparison.baseline.curve.tolist(),
                    "learned": comparison.curve.tolist(),
                    "guarded": guarded_curve.tolist(),
                },
            }
        )
    result = {
        "checkpoint": checkpoint_id(card),
        "experiment": args.experiment,
        "seeds_per_task": args.seeds,
        "steps": args.steps,
        "window": args.window,
        "seconds": round(time.time() - start, 1),
        "rows": rows,
    }
    _print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        _plot(result, args.plot)


def _print_table(result: dict) -> None:
    print(f"checkpoint {result['checkpoint']}, {result['seeds_per_task']} held-out seeds/task")
    print(
        "| task | tuned Adam lr | Adam final | learned final | guarded final | learned steps "
        "to Adam final | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(
            f"| {row['task'].get('name')} | {row['adam_lr']:g} | {row['adam_final_loss']:.4f} | "
            f"{row['learned_final_loss']:.4f} | {row['guarded_final_loss']:.4f} | "
            f"{row['learned_steps_to_adam_final']} / {result['steps']} | "
            f"{row['step_ratio']:.2f} |"
        )


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    row = result["rows"][0]
    for name, curve in row["curves"].items():
        label = f"Adam (tuned lr={row['adam_lr']:g})" if name == "adam" else name
        # Dashed: in distribution the guarded curve often lies exactly on the learned one.
        style = "--" if name == "guarded" else "-"
        ax.plot(range(1, len(curve) + 1), curve, style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of seeds, {result['window']}-step window)")
    ax.set_title(f"{result['checkpoint']} on held-out seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
