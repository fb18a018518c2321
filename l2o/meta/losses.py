"""Meta-losses: what a truncation of inner training scores, per population member.

An unroll over steps ``t = s .. s+K-1`` of an episode yields, for every member,

    train[k]    training loss at the parameters *after* update ``s+k`` (on the next train batch)
    eval[k]     held-out loss at the same parameters (only when the meta-loss asks for it)
    initial     training loss at the episode's initial parameters (a constant)

Losses are taken after each update so that every update of the truncation, the last one
included, is scored (the loss before the first update does not depend on this truncation's
rule at all). A meta-loss maps these to one number per member (shape ``[P]``); estimators
average over members (BPTT) or difference antithetic members (ES, PES).

Choices (``get_meta_loss(name)``):

    train_mean   mean_k train[k]
    eval         mean_k eval[k]                        held-out loss after every update
    eval_final   eval at the truncation's last step    one held-out evaluation per truncation
    log          mean_k log train[k]                   scale-free; needs non-negative losses
    normalized   mean_k train[k] / initial             comparable across tasks
    clipped      mean_k min(train[k], initial) / initial
                                                       as ``normalized``, and a diverging member
                                                       costs at most 1 per step, so one blow-up
                                                       does not dominate the meta-gradient
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from l2o.registry import Registry


class MetaLossTerms(NamedTuple):
    """The per-step losses of one truncation that meta-losses are built from."""

    #: ``[K, P]`` training loss after each update of the truncation.
    train: Tensor
    #: ``[P]`` training loss at the episode's initial parameters (no gradient).
    initial: Tensor
    #: ``[K, P]`` (eval mode "each"), ``[1, P]`` ("final") held-out losses, or None ("none").
    eval: Tensor | None = None


#: Which held-out losses an unroll computes: none, after every update, or after the last one.
EVAL_MODES = ("none", "each", "final")


@dataclass(frozen=True)
class MetaLoss:
    """A named meta-loss: ``meta_loss(terms) -> [P]``; ``eval_mode`` tells the unroll what to
    evaluate on the held-out split."""

    name: str
    fn: Callable[[MetaLossTerms], Tensor]
    eval_mode: str = "none"

    def __call__(self, terms: MetaLossTerms) -> Tensor:
        return self.fn(terms)


def _held_out(terms: MetaLossTerms) -> Tensor:
    if terms.eval is None:
        raise ValueError(
            "this meta-loss needs held-out losses: unroll with eval_mode 'each'/'final'"
        )
    return terms.eval


def _positive(x: Tensor) -> Tensor:
    # Normalizing by, or taking the log of, a loss that is exactly 0 would give inf; the
    # smallest positive float keeps the value finite without changing any realistic loss.
    return x.clamp_min(torch.finfo(x.dtype).tiny)


def train_mean(terms: MetaLossTerms) -> Tensor:
    """Mean training loss over the truncation's steps."""
    return terms.train.mean(0)


def eval_mean(terms: MetaLossTerms) -> Tensor:
    """Mean held-out loss over the truncation's steps."""
    return _held_out(terms).mean(0)


def eval_final(terms: MetaLossTerms) -> Tensor:
    """Held-out loss after the truncation's last update."""
    return _held_out(terms)[-1]


def log_mean(terms: MetaLossTerms) -> Tensor:
    """Mean log training loss (for non-negative losses)."""
    return torch.log(_positive(terms.train)).mean(0)


def normalized(terms: MetaLossTerms) -> Tensor:
    """Mean training loss divided by the episode's initial loss."""
    return (terms.train / _positive(terms.initial)).mean(0)


def clipped(terms: MetaLossTerms) -> Tensor:
    """Mean of min(loss, initial) / initial: normalized, and clipped at the initial loss."""
    initial = _positive(terms.initial)
    return (torch.minimum(terms.train, initial) / initial).mean(0)


META_LOSSES: Registry[MetaLoss] = Registry("meta-loss", "meta-losses")
for _loss in (
    MetaLoss("train_mean", train_mean),
    MetaLoss("eval", eval_mean, eval_mode="each"),
    MetaLoss("eval_final", eval_final, eval_mode="final"),
    MetaLoss("log", log_mean),
    MetaLoss("normalized", normalized),
    MetaLoss("clipped", clipped),
):
    META_LOSSES.register(_loss.name, _loss)


def get_meta_loss(name: str) -> MetaLoss:
    """The meta-loss registered as ``name`` (see the module docstring for the choices)."""
    return META_LOSSES[name]
