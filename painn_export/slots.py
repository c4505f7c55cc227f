"""The slot primitives: every sum over edges, forward and backward, without a scatter.

The model's graph is the neighbour-major ("slot") layout of
:mod:`painn_export.contract`. Its invariants, stated once (``N`` atoms,
``K`` slots per atom, ``P`` pairs; a flat slot is ``i * K + k``):

1. A padding slot (``neighbor_mask == 0``) of centre ``i`` has ``i`` itself as
   its neighbour, a zero shift, its own flat index as its reverse, and
   reads no pair (``slot_pair == P``).
2. Each edge's slot has as reverse the flat slot of its reverse edge; the
   reverse of the reverse is the slot itself.
3. A pair is an edge and its reverse (one length, one radial filter);
   ``pair_slots[p]`` holds its two flat slots. An entry ``N * K`` means "no
   slot": both entries of a spare pair (which no slot reads).

With them every primitive below has an exact adjoint that is a gather and a
fixed-width sum, so a traced backward has no scatter and every runtime sums
in one fixed order (bitwise repeatable):

- :func:`gather_neighbors` ``x[neighbors]``; its adjoint gathers the
  gradient through the reverse slots and sums over the slot axis (invariants
  1-2: the slots that read ``x_j`` are exactly the reverses of row ``j``).
- :func:`slots_to_pairs` reads each pair's value at its first slot, and
  appends one zero row (row ``P``: what padding slots read); its adjoint
  gives each value back to that slot only.
- :func:`pairs_to_slots` gives each slot its pair's row of ``[P + 1, ...]``
  (padding: row ``P``, zero in the model); its adjoint sums a pair's (one
  or two) slots, and the padding slots into row ``P``.

``torch.autograd.gradcheck`` checks each against its forward
(tests/test_slots.py), with spare pairs, padding and a fully packed layout.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from painn_export.contract import input_names


class GraphInputs(NamedTuple):
    """The graph's inputs (:mod:`painn_export.contract`), by name, as tensors.

    ``neighbor_reverse`` is given for gradient-force models (and any model
    traced for export with a backward); ``None`` otherwise. A ``NamedTuple``:
    ``torch.export`` and ``make_fx`` take it as they take a tuple.
    """

    atomic_numbers: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N, 3] Å
    neighbors: torch.Tensor  # [N, K] int64 senders j
    neighbor_shift: torch.Tensor  # [N, K, 3] Å
    neighbor_mask: torch.Tensor  # [N, K] 1 edge / 0 padding
    slot_pair: torch.Tensor  # [N, K] int64 pair of each slot (P: padding)
    pair_slots: torch.Tensor  # [P, 2] int64 flat slots of each pair (N * K: none)
    neighbor_reverse: torch.Tensor | None = None  # [N, K] int64 flat reverse slots

    @classmethod
    def from_feed(
        cls,
        feed: dict[str, np.ndarray],
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        gradient: bool = True,
    ) -> GraphInputs:
        """From a numpy feed (:func:`painn_export.batch.collate`): floats cast to ``dtype``."""
        tensors = {}
        for name in input_names(gradient):
            t = torch.from_numpy(np.ascontiguousarray(feed[name]))
            tensors[name] = (t.to(dtype) if t.is_floating_point() else t).to(device)
        return cls(**tensors)

    @property
    def exportable_backward(self) -> bool:
        """The reverse slots are given: every gather's backward is scatter-free."""
        return self.neighbor_reverse is not None


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` ``[*index.shape, ...]`` of ``x`` ``[rows, ...]``: one Gather, any index shape."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def take_or_zero(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]`` ``[n, ...]`` of ``x`` ``[rows, ...]``, zero where ``index == rows``.

    ``index`` ``[n]`` is 1-D and small (one per pair): the redirect and the
    0/1 weight cost a pass over the result only.
    """
    inside = index < x.shape[0]
    weight = inside.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # [n, 1, ...]
    return x.index_select(0, _inside_or_zero(index, inside)) * weight


def _inside_or_zero(index: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """``index`` where ``inside``, else row 0 (a valid read, weighted out by the caller).

    Written as ``Where`` with ``index - index``: TensorRT has neither ``Clip``
    nor a constant-of-shape on int64.
    """
    return torch.where(inside, index, index - index)


class _GatherNeighbors(torch.autograd.Function):
    """``x[neighbors]`` whose backward is a gather through the reverse slots and a slot sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, neighbors: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(reverse)
        return take(x, neighbors)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (reverse,) = ctx.saved_tensors
        flat = grad.reshape(-1, *grad.shape[2:])  # [N * K, ...]
        # Row j's reverse slots are the slots that read x_j: the reverses of
        # its edges, and its padding slots (which read x_j and are their own reverse).
        return take(flat, reverse).sum(dim=1), None, None


def gather_neighbors(
    x: torch.Tensor,  # [N, ...]
    neighbors: torch.Tensor,  # [N, K] int64
    reverse: torch.Tensor | None = None,  # [N, K] int64 flat reverse slots
) -> torch.Tensor:
    """Rows of the neighbours, ``x[neighbors]`` ``[N, K, ...]``.

    With ``reverse`` the backward is the scatter-free adjoint above (for
    gradient forces and export). Without it, autograd's own backward
    (``index_add``) is used: fine for inference, not for export.
    """
    if reverse is None:
        return take(x, neighbors)
    return _GatherNeighbors.apply(x, neighbors, reverse)


def _with_none(first_slots: torch.Tensor, n_slots_total: int) -> torch.Tensor:
    """``[P + 1]``: each pair's first slot, then "none" (``N * K``) for the padding's zero row.

    Written as arithmetic on a slice (no constant-of-shape on int64, which
    TensorRT lacks).
    """
    none = first_slots[:1] * 0 + n_slots_total
    return torch.cat([first_slots, none])


class _SlotsToPairs(torch.autograd.Function):
    """Each pair's row read at its first slot (zero for a spare pair), and a zero row for padding."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pair_slots: torch.Tensor, slot_pair: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pair_slots, slot_pair)
        return take_or_zero(x, _with_none(pair_slots[:, 0], x.shape[0]))  # [P + 1, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pair_slots, slot_pair = ctx.saved_tensors
        n_pairs = pair_slots.shape[0]
        pairs = slot_pair.reshape(-1)  # [N * K] the pair of each slot (P: none)
        slots = torch.arange(pairs.shape[0], dtype=pairs.dtype, device=pairs.device)
        has_pair = pairs < n_pairs
        safe = _inside_or_zero(pairs, has_pair)  # a padding slot reads pair 0, masked below
        # [N * K]: the slot its pair was read at (the zero row P depends on no slot)
        first = (pair_slots[:, 0].index_select(0, safe) == slots) & has_pair
        keep = first.to(grad.dtype).view(-1, *([1] * (grad.dim() - 1)))
        return grad.index_select(0, safe) * keep, None, None


class _PairsToSlots(torch.autograd.Function):
    """Each slot's row of ``y`` ``[P + 1, ...]``: its pair's, or the last (zero) row for padding.

    The adjoint sums a pair's (one or two) slots, and the padding slots into
    the last row.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, pair_slots: torch.Tensor, slot_pair: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pair_slots, slot_pair)
        return take(y, slot_pair)  # [N, K, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pair_slots, slot_pair = ctx.saved_tensors
        flat = grad.reshape(-1, *grad.shape[2:])  # [N * K, ...]
        pairs = take_or_zero(flat, pair_slots[:, 0]) + take_or_zero(flat, pair_slots[:, 1])  # [P, ...]
        padding = (slot_pair.reshape(-1) == pair_slots.shape[0]).to(flat.dtype)  # [N * K]
        padding = padding.view(-1, *([1] * (flat.dim() - 1)))
        return torch.cat([pairs, (flat * padding).sum(dim=0, keepdim=True)]), None, None


def slots_to_pairs(
    x: torch.Tensor,  # [N * K, ...]
    pair_slots: torch.Tensor,  # [P, 2]
    slot_pair: torch.Tensor,  # [N, K]
    exportable_backward: bool,
) -> torch.Tensor:
    """``[P + 1, ...]``: each pair's row of ``x`` at its first slot (zero for a spare pair), then the
    zero row that padding slots read. Padding costs no copy per use: the row is made once here."""
    if exportable_backward:
        return _SlotsToPairs.apply(x, pair_slots, slot_pair)
    return take_or_zero(x, _with_none(pair_slots[:, 0], x.shape[0]))


def pairs_to_slots(
    y: torch.Tensor,  # [P + 1, ...], the last row zero
    pair_slots: torch.Tensor,  # [P, 2]
    slot_pair: torch.Tensor,  # [N, K]
    exportable_backward: bool,
) -> torch.Tensor:
    """``[N, K, ...]``: each slot's pair row of ``y``; padding slots read its last (zero) row."""
    if exportable_backward:
        return _PairsToSlots.apply(y, pair_slots, slot_pair)
    return take(y, slot_pair)
