"""Attention masks beyond causal: packed documents, sliding windows and mask functions.

A mask is described once per batch -- :class:`Documents` (which positions form which
document, and which are padding), a window ``(left, right)`` and a mask function -- and
reduced, for any pair of *sorted* global position lists (the queries one rank holds, the keys
of one K/V block), to one fact per query row: the contiguous range ``[klo, khi)`` of local
key indices it may see. That fact is exact because a document is a run of consecutive
positions and a window an interval around the query, so the keys a query sees form one
interval of positions, hence one run of sorted local keys.

From the ranges come, without ever building an ``S x S`` mask:

- the block facts the plans use (:class:`PairMask`): a pair is ``empty`` (skipped: neither
  computed nor sent), ``full`` (the unmasked kernel), ``causal`` (the unmasked causal
  kernel: same positions on both sides, each query sees exactly the keys up to itself) or
  ``partial`` (a masked kernel);
- the tile facts FlexAttention's BlockMask is made of, and the explicit boolean masks the
  CPU kernels take;
- each position's attention work (visible keys), which the balanced layout evens out.

A mask function (FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` over global positions)
can only narrow what the ranges allow: it is applied inside the masked kernels and never
makes a block empty for the plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["Documents", "MaskArgumentError", "MaskSpec", "PairMask", "normalize_window"]

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class MaskArgumentError(Exception):
    """A bad mask argument: ``argument`` names it, ``exc_type`` is what the caller raises."""

    def __init__(self, argument: str, exc_type: type[Exception], message: str) -> None:
        super().__init__(message)
        self.argument = argument
        self.exc_type = exc_type
        self.message = message


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        h.update(part)
    return int.from_bytes(h.digest(), "little") >> 1  # fits a signed int64


def _as_int_tensor(x: object, name: str) -> Tensor:
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {x.dtype}")
        return x.detach().to("cpu", torch.int64)
    try:
        return torch.tensor(x, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{name} must be a tensor or a (nested) list of ints, got {type(x).__name__}"
        ) from None


class Documents:
    """Packed documents of one batch: which positions form which document, and padding.

    Build it once per batch and pass it to every attention layer (and to
    :func:`ringattn.shard`, which cuts the balanced layout it implies). A query attends only
    keys of its own document; padding positions attend nothing and are attended by nothing
    (their output is 0). One description serves every batch row, or there is one per row.

    Attributes:
        seq_len: the global sequence length S the description covers.
        batch_size: the number of rows described, or None when one description is shared
            by all rows.
    """

    __slots__ = ("_hi", "_lo", "doc_ids", "fingerprint", "batch_size")

    def __init__(self, doc_ids: Tensor, *, shared: bool) -> None:
        # doc_ids [R, S] int64: a document is a run of equal ids >= 0; -1 marks padding.
        self.doc_ids = doc_ids.contiguous()
        self.batch_size: int | None = None if shared else doc_ids.size(0)
        rows, s = doc_ids.shape
        pos = torch.arange(s).expand(rows, s)
        starts = torch.ones(rows, s, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        ends = torch.ones(rows, s, dtype=torch.bool)
        ends[:, :-1] = starts[:, 1:]
        lo = torch.where(starts, pos, 0).cummax(dim=1).values
        hi = torch.where(ends, pos, s).flip(1).cummin(dim=1).values.flip(1)
        pad = doc_ids < 0
        # Inclusive global interval of the keys each position's document holds (empty for
        # padding: lo > hi).
        self._lo = torch.where(pad, pos + 1, lo)
        self._hi = torch.where(pad, pos, hi)
        self.fingerprint = _digest(str((rows, s, shared)).encode(), self.doc_ids.numpy().tobytes())

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | Sequence[Sequence[int]]) -> Documents:
        """Documents of the given lengths, one after another from position 0.

        ``lengths``: one list for all rows, or one list per batch row (each summing to the
        same global sequence length). Zero lengths are allowed and describe nothing.
        """
        if isinstance(lengths, Tensor):
            lengths = lengths.tolist()
        if not isinstance(lengths, (list, tuple)) or not lengths:
            raise TypeError("lengths must be a non-empty list of ints or of lists of ints")
        per_row = isinstance(lengths[0], (list, tuple))
        rows = lengths if per_row else [lengths]
        ids = []
        for r, row in enumerate(rows):
            if not isinstance(row, (list, tuple)) or not all(
                isinstance(n, int) and not isinstance(n, bool) for n in row
            ):
                raise TypeError(f"lengths must hold ints (row {r}: {row!r})")
            if any(n < 0 for n in row):
                raise ValueError(f"lengths must be >= 0, got {list(row)} (row {r})")
            if sum(row) == 0:
                raise ValueError(f"lengths must sum to the sequence length, got 0 (row {r})")
            ids.append(torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)))
        totals = {int(x.numel()) for x in ids}
        if len(totals) > 1:
            raise ValueError(
                "lengths: every row must sum to the same sequence length, got "
                f"{[int(x.numel()) for x in ids]}"
            )
        return cls(torch.stack(ids), shared=not per_row)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: object) -> Documents:
        """Documents from cumulative offsets ``[0, l0, l0+l1, ..., S]`` (1-D for all rows,
        2-D ``[B, n+1]`` per row), as variable-length flash attention takes them."""
        cu = _as_int_tensor(cu_seqlens, "cu_seqlens")
        if cu.dim() not in (1, 2) or cu.size(-1) < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D or 2-D with >= 2 offsets, got {tuple(cu.shape)}"
            )
        rows = cu.view(-1, cu.size(-1))
        if bool((rows[:, 0] != 0).any()):
            raise ValueError("cu_seqlens must start at 0")
        lengths = rows.diff(dim=1)
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        lists = lengths.tolist()
        return cls.from_lengths(lists if cu.dim() == 2 else lists[0])

    @classmethod
    def from_position_ids(cls, position_ids: object) -> Documents:
        """Documents from position ids ``[S]`` or ``[B, S]``: a position that restarts at 0
        starts a new document (the padding-free convention of Hugging Face collators)."""
        pos = _as_int_tensor(position_ids, "position_ids")
        if pos.dim() not in (1, 2) or pos.size(-1) < 1:
            raise ValueError(f"position_ids must be [S] or [B, S], got {tuple(pos.shape)}")
        rows = pos.view(-1, pos.size(-1))
        restart = rows == 0
        restart[:, 0] = True
        return cls(restart.long().cumsum(dim=1) - 1, shared=pos.dim() == 1)

    @classmethod
    def from_attention_mask(
        cls, attention_mask: object, position_ids: object | None = None
    ) -> Documents:
        """Documents of a padded batch: ``attention_mask [B, S]`` holds 1 for tokens and 0
        for padding (Hugging Face's convention). Without ``position_ids`` each row's tokens
        are one document, and padding must sit at the start or the end of the row; with
        them, a position restarting at 0 also starts a document (packed and padded)."""
        mask = _as_int_tensor(attention_mask, "attention_mask")
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be [B, S], got {tuple(mask.shape)}")
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        token = mask.bool()
        if position_ids is None:
            edges = (token[:, 1:] != token[:, :-1]).sum(dim=1)
            inner = edges - (~token[:, 0]).long() - (~token[:, -1]).long()
            if bool((inner > 0).any()):
                raise ValueError(
                    "attention_mask: padding inside a row (not at its start or end) needs "
                    "position_ids to say where documents start"
                )
            ids = torch.zeros_like(mask)
        else:
            pos = _as_int_tensor(position_ids, "position_ids")
            if pos.dim() == 1:
                pos = pos.expand_as(mask)
            if pos.shape != mask.shape:
                raise ValueError(
                    f"position_ids {tuple(pos.shape)} must match attention_mask {tuple(mask.shape)}"
                )
            restart = pos == 0
            restart[:, 0] = True
            ids = restart.long().cumsum(dim=1) - 1
        return cls(torch.where(token, ids, -1), shared=False)

    # ------------------------------------------------------------------ facts

    @property
    def seq_len(self) -> int:
        return self.doc_ids.size(1)

    @property
    def rows(self) -> int:
        """How many rows the description holds (1 when shared)."""
        return self.doc_ids.size(0)

    def __repr__(self) -> str:
        counts = [
            int(torch.unique(row[row >= 0]).numel()) for row in self.doc_ids[: min(self.rows, 4)]
        ]
        return (
            f"Documents(seq_len={self.seq_len}, batch_size={self.batch_size}, "
            f"documents per row={counts}{'...' if self.rows > 4 else ''})"
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Documents)
            and self.fingerprint == other.fingerprint
            and self.batch_size == other.batch_size
            and torch.equal(self.doc_ids, other.doc_ids)
        )

    def __hash__(self) -> int:
        return self.fingerprint

    def key_interval(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Inclusive ``(lo, hi)`` ``[R, len]`` global key interval of each position's document."""
        return self._lo[:, positions], self._hi[:, positions]

    def dense_mask(
        self,
        *,
        causal: bool = False,
        window: tuple[int, int] | None = None,
        mask_mod: MaskMod | None = None,
        heads: int = 1,
    ) -> Tensor:
        """The boolean mask ``[R, 1 or heads, S, S]`` (True = query i sees key j) that this
        description with these options means. For references and tests: O(S^2) memory."""
        spec = MaskSpec.build(self, causal, window, mask_mod)
        pos = torch.arange(self.seq_len)
        pair = PairMask.build(spec, pos, pos)
        return pair.dense(self.rows, heads)


def normalize_window(window: object) -> tuple[int, int] | None:
    """``window`` as ``(left, right)`` with -1 unbounded, or None when it masks nothing.

    Raises MaskArgumentError naming ``window`` for anything else.
    """
    if window is None:
        return None
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise MaskArgumentError(
            "window", TypeError, f"window must be a (left, right) pair of ints, got {window!r}"
        )
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise MaskArgumentError(
            "window",
            ValueError,
            f"window sizes must be >= 0 (or -1 for unbounded), got (left={left}, right={right})",
        )
    if left == -1 and right == -1:
        return None
    return left, right


@dataclass(frozen=True, eq=False)
class MaskSpec:
    """One call's mask: documents (or none), causal, a normalised window, a mask function."""

    documents: Documents | None
    causal: bool
    window: tuple[int, int] | None
    mask_mod: MaskMod | None
    seq_len: int

    @staticmethod
    def build(
        documents: Documents | None,
        causal: bool,
        window: object,
        mask_mod: MaskMod | None,
        seq_len: int | None = None,
    ) -> MaskSpec:
        if documents is not None and not isinstance(documents, Documents):
            raise MaskArgumentError(
                "documents",
                TypeError,
                f"documents must be a ringattn.Documents, got {type(documents).__name__}",
            )
        if mask_mod is not None and not callable(mask_mod):
            raise MaskArgumentError(
                "mask_mod", TypeError, f"mask_mod must be callable, got {type(mask_mod).__name__}"
            )
        if seq_len is None:
            assert documents is not None
            seq_len = documents.seq_len
        return MaskSpec(documents, causal, normalize_window(window), mask_mod, seq_len)

    @property
    def key(self) -> tuple:
        """Hashable identity of everything the plans depend on."""
        docs = self.documents.fingerprint if self.documents is not None else None
        return (docs, self.causal, self.window, self.mask_mod, self.seq_len)

    @property
    def fingerprint(self) -> int:
        """A deterministic 63-bit digest, equal on every rank that describes the same mask."""
        mod = self.mask_mod
        name = ""
        if mod is not None:
            qualname = getattr(mod, "__qualname__", type(mod).__name__)
            name = f"{getattr(mod, '__module__', '')}.{qualname}"
        docs = self.documents.fingerprint if self.documents is not None else 0
        return _digest(str((docs, self.causal, self.window, name, self.seq_len)).encode())

    def key_interval(self, qpos: Tensor) -> tuple[Tensor, Tensor]:
        """Inclusive global key interval ``(lo, hi)`` ``[R, len(qpos)]`` per query position."""
        if self.documents is not None:
            lo, hi = self.documents.key_interval(qpos)
        else:
            lo = torch.zeros(1, qpos.numel(), dtype=torch.int64)
            hi = torch.full((1, qpos.numel()), self.seq_len - 1, dtype=torch.int64)
        if self.causal:
            hi = torch.minimum(hi, qpos)
        if self.window is not None:
            left, right = self.window
            if left >= 0:
                lo = torch.maximum(lo, qpos - left)
            if right >= 0:
                hi = torch.minimum(hi, qpos + right)
        return lo, hi

    def probe_mask_mod(self, batch: int, heads: int, device: torch.device | None = None) -> None:
        """Call the mask function on a few positions (index tensors on ``device``, where the
        kernels call it too); MaskArgumentError if it fails or returns anything but a bool
        tensor broadcastable to ``[b, h, q, kv]``."""
        if self.mask_mod is None:
            return
        n = min(self.seq_len, 4)
        pos = torch.cat([torch.arange(n), torch.arange(self.seq_len - n, self.seq_len)])
        nb, nh = min(batch, 2), min(heads, 2)
        args = _grid(
            torch.arange(nb, device=device),
            torch.arange(nh, device=device),
            pos.to(device),
            pos.to(device),
        )
        try:
            out = self.mask_mod(*args)
        except Exception as err:  # noqa: BLE001 - reported as the argument's error
            raise MaskArgumentError(
                "mask_mod",
                ValueError,
                f"mask_mod raised {type(err).__name__}: {str(err)[:200]} when called as "
                "mask_mod(b, h, q_idx, kv_idx) on broadcastable int64 index tensors",
            ) from None
        _check_mask_mod_result(out, (nb, nh, pos.numel(), pos.numel()))


def _grid(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), q.view(1, 1, -1, 1), kv.view(1, 1, 1, -1)


def _check_mask_mod_result(out: object, shape: tuple[int, ...]) -> None:
    if not isinstance(out, Tensor) or out.dtype != torch.bool:
        what = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise MaskArgumentError(
            "mask_mod", TypeError, f"mask_mod must return a bool tensor, got {what}"
        )
    try:
        torch.broadcast_shapes(out.shape, shape)
        ok = out.dim() <= 4 and len(torch.broadcast_shapes(out.shape, shape)) == 4
        ok = ok and tuple(torch.broadcast_shapes(out.shape, shape)) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise MaskArgumentError(
            "mask_mod",
            ValueError,
            f"mask_mod returned shape {tuple(out.shape)}, which does not broadcast to "
            f"(b, h, q, kv) = {shape}",
        )


@dataclass(frozen=True, eq=False)
class PairMask:
    """The mask of one block pair: sorted global query positions ``qpos`` against sorted key
    positions ``kpos``, as the visible local key range ``[klo, khi)`` of each query row
    (``[R, Sq]``, R = 1 or the batch), plus the mask function on global positions."""

    spec: MaskSpec
    qpos: Tensor
    kpos: Tensor
    klo: Tensor
    khi: Tensor
    kind: str  # "empty" | "full" | "causal" | "partial"
    visible: int  # visible (row, query, key) triples, before the mask function
    head_offset: int = 0  # global index of the first local head (Ulysses shards heads)

    @staticmethod
    def build(spec: MaskSpec, qpos: Tensor, kpos: Tensor, head_offset: int = 0) -> PairMask:
        lo, hi = spec.key_interval(qpos)
        klo = torch.searchsorted(kpos, lo)
        khi = torch.maximum(torch.searchsorted(kpos, hi, right=True), klo)
        visible = int((khi - klo).sum())
        sq, sk = qpos.numel(), kpos.numel()
        if visible == 0:
            kind = "empty"
        elif spec.mask_mod is not None:
            kind = "partial"
        elif bool((klo == 0).all()) and bool((khi == sk).all()):
            kind = "full"
        elif (
            sq == sk
            and torch.equal(qpos, kpos)
            and bool((klo == 0).all())
            and torch.equal(khi, torch.arange(1, sq + 1).expand_as(khi))
        ):
            kind = "causal"
        else:
            kind = "partial"
        return PairMask(spec, qpos, kpos, klo, khi, kind, visible, head_offset)

    def padded(self, keys: int) -> PairMask:
        """The same mask over ``keys`` local keys, the ones past ``kpos`` seen by no query
        (they round a key count up to a size the compiled kernels already have). They repeat
        the last key position, so a mask function still sees valid positions; the key
        ranges, which leave them out, are unchanged."""
        extra = keys - self.kpos.numel()
        if extra <= 0:
            return self
        kpos = torch.cat([self.kpos, self.kpos[-1:].expand(extra)])
        kind = "partial" if self.kind in ("full", "causal") else self.kind
        return replace(self, kpos=kpos, kind=kind)

    def dense(self, batch: int, heads: int, device: torch.device | None = None) -> Tensor:
        """The explicit mask ``[R or batch, 1 or heads, Sq, Sk]`` (True = visible)."""
        j = torch.arange(self.kpos.numel(), device=device)
        klo, khi = self.klo.to(device), self.khi.to(device)
        mask = (j >= klo.unsqueeze(-1)) & (j < khi.unsqueeze(-1))
        mask = mask.unsqueeze(1)
        mod = self.spec.mask_mod
        if mod is not None:
            args = _grid(
                torch.arange(batch, device=device),
                torch.arange(heads, device=device) + self.head_offset,
                self.qpos.to(device),
                self.kpos.to(device),
            )
            extra = mod(*args)
            _check_mask_mod_result(extra, (batch, heads, self.qpos.numel(), self.kpos.numel()))
            mask = mask & extra
        return mask

    def tile_facts(self, tile: int) -> tuple[Tensor, Tensor]:
        """``(touched, full)`` ``[R, q tiles, k tiles]`` bools over ``tile``-sized tiles of
        local rows and keys: some / every query row of the tile sees some / every key of it
        (before the mask function). Difference arrays over tile indices: O(R x (Sq + tiles^2))."""
        rows, sq = self.klo.shape
        sk = self.kpos.numel()
        nq, nk = -(-sq // tile), -(-sk // tile)
        qt = (torch.arange(sq) // tile).expand(rows, sq)
        r = torch.arange(rows).unsqueeze(1).expand(rows, sq)

        def count(lo_t: Tensor, hi_t: Tensor) -> Tensor:
            # Rows of each q tile whose tile range [lo_t, hi_t) covers each k tile.
            some = hi_t > lo_t
            diff = torch.zeros(rows, nq, nk + 1, dtype=torch.int64)
            ones = some.long()
            diff.index_put_((r, qt, lo_t.clamp(max=nk)), ones, accumulate=True)
            diff.index_put_((r, qt, hi_t.clamp(max=nk)), -ones, accumulate=True)
            return diff.cumsum(-1)[..., :nk]

        some = self.khi > self.klo
        lo_t = torch.where(some, self.klo // tile, 0)
        hi_t = torch.where(some, (self.khi - 1) // tile + 1, 0)
        touched = count(lo_t, hi_t) > 0
        # Whole tiles inside [klo, khi): the last tile may be short (ends at sk).
        f_lo = -(-self.klo // tile)
        f_hi = torch.where(self.khi >= sk, nk, self.khi // tile)
        f_hi = torch.where(some, torch.maximum(f_hi, f_lo), f_lo)
        rows_per_tile = torch.full((nq,), tile, dtype=torch.int64)
        rows_per_tile[-1] = sq - (nq - 1) * tile
        full = count(f_lo, f_hi) == rows_per_tile.view(1, nq, 1)
        return touched, full & touched
