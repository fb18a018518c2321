"""Weight-norm growth of a learned optimizer on `real_models`' 10,000-step autoencoder.

Trains the autoencoder (digits, 64-128-16-128-64) with the shipped ``ortho_mlp`` under the wsd
cool-down, printing every 1,000 steps the training and held-out loss, the norm of the first
layer's columns for input pixels that are zero in every training image ("dead") and of the
others, and every matrix's norm. Ablations, applied to the deployed rule (no retraining):

    python scripts/diagnose_weight_growth.py                # as shipped
    python scripts/diagnose_weight_growth.py --mask-unseen  # no update where v == 0
    python scripts/diagnose_weight_growth.py --no-param-feature  # the p / rms(p) input set to 0
    python scripts/diagnose_weight_growth.py --adam         # Adam at lr 3e-3 for comparison
    python scripts/diagnose_weight_growth.py --rule muon --lr 0.02  # any registered rule
    python scripts/diagnose_weight_growth.py --checkpoint runs/ortho_noparam/checkpoints/last
    python scripts/diagnose_weight_growth.py --no-param-feature --vector-rule adamw  # AdamW vectors
    python scripts/diagnose_weight_growth.py --schedule constant  # as deployed without total_steps

A diagnostic, not a benchmark: ``--mask-unseen`` sets ``OrthoMLPLOpt``'s ``mask_unseen``;
``--no-param-feature`` monkeypatches ``OrthoMLPRule`` in this process only (the option
``parameter_feature=False`` removes the input, which a checkpoint meta-trained with it cannot
load); ``--vector-rule`` sets ``vector_rule`` (and its ``lr``, ``weight_decay``) on the loaded
checkpoint, whose learned vector step is then unused. Besides the norms it prints the vectors'
(biases') norms and the largest loss of one held-out image, which is where the held-out loss
explodes.
"""

from __future__ import annotations

import argparse

import torch

import l2o
import l2o.learned.ortho_lopt as ortho
from l2o.learned.optimizer import CheckpointedRules
from l2o.optim.base import apply_updates
from l2o.tasks.supervised import AutoencoderTask

DIRECTIONS = ("_direction_reference", "_direction_fused")


def _patch(transform) -> None:
    """Wrap both direction functions of the rule with ``transform(orig) -> new``."""
    for name in DIRECTIONS:
        setattr(ortho.OrthoMLPRule, name, transform(getattr(ortho.OrthoMLPRule, name)))


def _no_param_feature(orig):
    def direction(self, g, p, m, v, matrix, constants):
        return orig(self, g, torch.zeros_like(p), m, v, matrix, constants)

    return direction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--adam", action="store_true", help="the same as --rule adam")
    parser.add_argument("--rule", help="a registered hand-designed rule instead")
    parser.add_argument("--lr", type=float, default=3e-3, help="the --rule's learning rate")
    parser.add_argument("--mask-unseen", action="store_true")
    parser.add_argument("--no-param-feature", action="store_true")
    parser.add_argument("--checkpoint", default="ortho_mlp", help="shipped name or path")
    parser.add_argument("--schedule", default="wsd", help="the update schedule over --steps")
    parser.add_argument("--vector-rule", help="a registered rule for the vectors (e.g. adamw)")
    parser.add_argument("--vector-lr", type=float, default=3e-3, help="--vector-rule's lr")
    parser.add_argument("--vector-weight-decay", type=float, default=0.1)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.no_param_feature:
        _patch(_no_param_feature)
    task = AutoencoderTask(dataset="digits", width=128, bottleneck=16, batch_size=64)
    train_x, _ = task.data.split("train")
    dead = train_x.abs().sum(0) == 0
    if args.adam or args.rule:
        rule = l2o.optim.get(args.rule or "adam", lr=args.lr)
    else:
        learned = CheckpointedRules(args.checkpoint, args.steps, args.schedule)
        options = learned.lopt.config()  # the rule's own options, with its meta-parameters
        if args.mask_unseen:
            options["mask_unseen"] = True
        if args.vector_rule:
            options["vector_rule"] = args.vector_rule
            options["vector_hparams"] = {
                "lr": args.vector_lr,
                "weight_decay": args.vector_weight_decay,
            }
        learned.lopt = ortho.OrthoMLPLOpt(**options)
        rule = learned.annealed(learned.rule(torch.device("cpu")))
    params = task.init(torch.Generator().manual_seed(0))
    state = rule.init(params)
    first = next(k for k, p in params.items() if p.ndim == 2)
    print(f"{int(dead.sum())} of {train_x.shape[1]} input pixels are 0 in every training image")
    for t in range(args.steps):
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = task.loss(leaves, task.batch(0, t))
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        updates, state = rule.update(grads, state, params, step=t)
        params = {k: v.detach() for k, v in apply_updates(params, updates).items()}
        if t % 1000 == 0 or t == args.steps - 1:
            with torch.no_grad():
                (x,) = task.batch(0, t, "eval")
                per_image = ((task.apply(params, x) - x) ** 2).mean(1)
            w = params[first]
            norms = {
                kind: " ".join(f"{float(p.norm()):.1f}" for p in params.values() if keep(p))
                for kind, keep in [
                    ("matrix", lambda p: p.ndim == 2),
                    ("vector", lambda p: p.ndim < 2),
                ]
            }
            print(
                f"step {t}: train {loss.item():.4f} held-out {float(per_image.mean()):.4f} "
                f"(worst image {float(per_image.max()):.1f}) "
                f"|W1 dead columns| {float(w[:, dead].norm()):.2f} "
                f"|W1 others| {float(w[:, ~dead].norm()):.2f} "
                f"matrix norms {norms['matrix']} vector norms {norms['vector']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
