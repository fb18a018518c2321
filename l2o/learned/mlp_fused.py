"""The fused, blocked step of the ``mlp`` learned optimizer (``MLPRule.update``).

The reference :meth:`MLPRule.reference_update` assembles every coordinate's 34 features into one
``[numel, 34]`` matrix (a 12-piece ``torch.cat``, four pieces of which are row or column
statistics broadcast to the full tensor) and runs the MLP on it: about 500 bytes of transient
memory per coordinate of the largest tensor, and every op streams through main memory. This
module computes the same update (to float32 rounding) in two passes over blocks of about
``chunk_size`` coordinates, so that what a block touches stays in cache:

1. New accumulators (the state update, elementwise), then the per-tensor normaliser of every
   feature, ``mean(x²)``: the per-coordinate features are assembled block by block and reduced;
   the row and column statistics are reduced at their own size, because a value broadcast ``C``
   times has the same mean square as the ``[R]`` vector it came from.
2. Per block: the per-coordinate features (22 of the 34 by default) through the first layer,
   plus the row and column statistics' share of the first layer, computed once at ``[R, H]``
   and ``[C, H]`` and broadcast (first-layer linearity: ``x W = Σ_groups x_group W_group``);
   then the hidden layers and the output, into the block's slice of the update.

A tensor that fits in one block is assembled once, not twice. Everything is pure (no in-place
op on an input, no ``out=``), so the fused step also runs under ``torch.func.vmap`` and
autograd. ``update`` (:class:`l2o.learned.rule.BlockedLearnedRule`) uses it for tensors of
more than one block, and for every tensor inside a graph being compiled (the meta-training
unrolls' compiled truncations, where Inductor runs the feature-major layout faster); the
reference elsewhere.

Layout: a factored tensor (Adafactor's two largest dims ``row_dim < col_dim``) is viewed, without
a copy, as ``[A, R, B, C, D]`` (``A``, ``B``, ``D``: products of the dims before, between and
after the two factored ones); its row statistics are ``[A, R, B, D]`` and its column statistics
``[A, B, C, D]``. Blocks are ranges of ``R`` within one index of ``A``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from l2o.learned.features import factored_dims

#: Coordinates per block: large enough for efficient matrix products, small enough that a
#: block's features and hidden activations (~350 bytes per coordinate) stay in L2 cache.
CHUNK_SIZE = 16384

#: The reference's feature columns, in order: (name, which decay count sets the width).
FEATURE_GROUPS: tuple[tuple[str, str], ...] = (
    ("g", "one"),
    ("p", "one"),
    ("m", "momentum"),
    ("v", "rms"),
    ("m_rsqrt_v", "momentum"),
    ("rsqrt_v", "rms"),
    ("row", "adafactor"),
    ("col", "adafactor"),
    ("rsqrt_row", "adafactor"),
    ("rsqrt_col", "adafactor"),
    ("g_rsqrt_v_hat", "adafactor"),
    ("m_rsqrt_v_hat", "momentum"),
)
#: The groups that are row / column statistics in a factored tensor.
ROW_GROUPS = ("row", "rsqrt_row")
COL_GROUPS = ("col", "rsqrt_col")


def feature_slices(widths: dict[str, int]) -> dict[str, slice]:
    """The column range of every feature group in the reference's feature matrix."""
    widths = {"one": 1, **widths}
    slices, start = {}, 0
    for name, width_of in FEATURE_GROUPS:
        slices[name] = slice(start, start + widths[width_of])
        start += widths[width_of]
    return slices


def _rsqrt(x: Tensor, eps: float) -> Tensor:
    return torch.rsqrt(x + eps)


def row_blocks(rows: int, row_numel: int, chunk_size: int) -> list[tuple[int, int]]:
    """Ranges ``[start, stop)`` of ``rows`` rows of ``row_numel`` coordinates each, about
    ``chunk_size`` coordinates per range (one row at least)."""
    per_block = max(1, chunk_size // max(1, row_numel))
    return [(s, min(rows, s + per_block)) for s in range(0, rows, per_block)]


def _sum_squares(x_t: Tensor) -> Tensor:
    """``sum(x², over coordinates)`` of feature-major ``[c, n]`` features."""
    return torch.sum(x_t * x_t, dim=1)


class TensorStep:
    """One tensor's fused step; built per tensor by ``MLPRule._tensor_update_fused``.

    Args:
        g, p: gradient and parameter, already in the accumulators' dtype.
        m, v, row, col: the *new* accumulators (``col`` empty when not factored).
        rsqrt_eps: epsilon inside every rsqrt of a second moment.
        widths: number of decays per group (``momentum``, ``rms``, ``adafactor``).
    """

    def __init__(
        self,
        g: Tensor,
        p: Tensor,
        m: Tensor,
        v: Tensor,
        row: Tensor,
        col: Tensor,
        *,
        rsqrt_eps: float,
        widths: dict[str, int],
        chunk_size: int,
    ) -> None:
        self.eps = rsqrt_eps
        self.slices = feature_slices(widths)
        self.numel = g.numel()
        dims = factored_dims(tuple(g.shape))
        self.factored = dims is not None
        k, r, f = widths["momentum"], widths["rms"], widths["adafactor"]
        if dims is None:
            n = self.numel
            self.g, self.p = g.reshape(1, n), p.reshape(1, n)
            self.m, self.v, self.row = m.reshape(1, n, k), v.reshape(1, n, r), row.reshape(1, n, f)
            self.blocks = [(0, s, e) for s, e in row_blocks(n, 1, chunk_size)]
            self.coord_groups = tuple(name for name, _ in FEATURE_GROUPS)
            return
        row_dim, col_dim = dims
        shape = tuple(g.shape)
        a = math.prod(shape[:row_dim])
        b = math.prod(shape[row_dim + 1 : col_dim])
        d = math.prod(shape[col_dim + 1 :])
        rows, cols = shape[row_dim], shape[col_dim]
        five = (a, rows, b, cols, d)
        self.g, self.p = g.reshape(five), p.reshape(five)
        self.m, self.v = m.reshape(*five, k), v.reshape(*five, r)
        self.row = row.reshape(a, rows, b, d, f)
        self.col = col.reshape(a, b, cols, d, f)
        # Adafactor's rank-1 estimate v̂ = (row / mean_R(row)) ⊗ col, kept as its two factors.
        self.row_normalized = self.row / (torch.mean(self.row, dim=1, keepdim=True) + rsqrt_eps)
        self.blocks = [
            (i, s, e) for i in range(a) for s, e in row_blocks(rows, b * cols * d, chunk_size)
        ]
        self.coord_groups = tuple(
            name for name, _ in FEATURE_GROUPS if name not in ROW_GROUPS + COL_GROUPS
        )

    def coordinate_features(self, block: tuple[int, int, int]) -> Tensor:
        """``[c, n]``: the per-coordinate feature groups of one block, in ``coord_groups``
        order, feature-major: every elementwise op then runs over ``n`` contiguous values
        (coordinate-major pieces of width 1 to 5 make ``torch.cat`` and the products several
        times slower); the first layer takes the transpose as a strided matrix."""
        i, s, e = block
        g, p = self.g[i, s:e].reshape(1, -1), self.p[i, s:e].reshape(1, -1)
        n = g.shape[1]
        m = self.m[i, s:e].reshape(n, -1).T
        v = self.v[i, s:e].reshape(n, -1).T
        rsqrt_v = _rsqrt(v, self.eps)
        if self.factored:
            # v̂ of the block: [f, n_R, B, 1, D] * [f, 1, B, C, D], then flattened to [f, n].
            row = self.row_normalized[i, s:e].movedim(-1, 0).unsqueeze(3)
            col = self.col[i].movedim(-1, 0).unsqueeze(1)
            rsqrt_v_hat = _rsqrt(row * col, self.eps).reshape(-1, n)
            pieces = {}
        else:
            row = self.row[i, s:e].reshape(n, -1).T
            rsqrt_v_hat = rsqrt_row = _rsqrt(row, self.eps)
            pieces = {"row": row, "col": row, "rsqrt_row": rsqrt_row, "rsqrt_col": rsqrt_row}
        pieces.update(
            g=g,
            p=p,
            m=m,
            v=v,
            m_rsqrt_v=m * rsqrt_v[-1:],
            rsqrt_v=rsqrt_v,
            g_rsqrt_v_hat=g * rsqrt_v_hat,
            m_rsqrt_v_hat=m * rsqrt_v_hat[-1:],
        )
        return torch.cat([pieces[name] for name in self.coord_groups])

    def mean_squares(self) -> tuple[Tensor, Tensor | None]:
        """``mean(x²)`` of every feature column over the whole tensor, in the reference's order,
        and, for a tensor of one block, that block's features (assembled on the way, so not
        assembled a second time; None for more blocks)."""
        total = None
        for block in self.blocks:
            x = self.coordinate_features(block)
            total = _sum_squares(x) if total is None else total + _sum_squares(x)
        only_block = x if len(self.blocks) == 1 else None
        coord = total / self.numel
        widths = [self.slices[name].stop - self.slices[name].start for name in self.coord_groups]
        parts = dict(zip(self.coord_groups, torch.split(coord, widths), strict=True))
        if self.factored:
            # A row statistic is repeated C times in the full tensor: the same mean square.
            parts["row"] = torch.mean(self.row * self.row, dim=(0, 1, 2, 3))
            parts["col"] = torch.mean(self.col * self.col, dim=(0, 1, 2, 3))
            parts["rsqrt_row"] = torch.mean(1.0 / (self.row + self.eps), dim=(0, 1, 2, 3))
            parts["rsqrt_col"] = torch.mean(1.0 / (self.col + self.eps), dim=(0, 1, 2, 3))
        return torch.cat([parts[name] for name, _ in FEATURE_GROUPS]), only_block

    def first_layer_shares(
        self, w_scaled: Tensor, bias: Tensor
    ) -> tuple[Tensor, Callable[[tuple[int, int, int]], Tensor]]:
        """The first layer's weight rows of the per-coordinate groups, and a function giving,
        for one block, the first layer's bias plus the row and column statistics' share of the
        first layer (``[n, H]``; just ``bias`` when the tensor is not factored), to be the
        ``input`` of one ``addmm``. ``w_scaled``: first-layer weights with the normaliser
        folded in, ``[34, H]``."""
        w_coord = torch.cat([w_scaled[self.slices[name]] for name in self.coord_groups])
        if not self.factored:
            return w_coord, lambda block: bias
        eps = self.eps
        w_row = torch.cat([w_scaled[self.slices[name]] for name in ROW_GROUPS])
        w_col = torch.cat([w_scaled[self.slices[name]] for name in COL_GROUPS])
        row_rows = torch.cat([self.row, _rsqrt(self.row, eps)], dim=-1)
        row_share = torch.addmm(bias, row_rows.reshape(-1, row_rows.shape[-1]), w_row)
        row_share = row_share.reshape(*self.row.shape[:-1], -1)  # [A, R, B, D, H]
        col_share = torch.cat([self.col, _rsqrt(self.col, eps)], dim=-1) @ w_col  # [A,B,C,D,H]

        def share(block: tuple[int, int, int]) -> Tensor:
            i, s, e = block
            both = row_share[i, s:e].unsqueeze(2) + col_share[i].unsqueeze(0)  # [n,B,C,D,H]
            return both.reshape(-1, both.shape[-1])

        return w_coord, share
