"""HiRE-LR: a rank-r proxy U (V x), fitted to the hidden states the layer really sees.

A plain SVD of W keeps the directions in which W is large, not the ones in which the logits W x
vary for real inputs x. The activation-aware ("whitened") SVD minimises E||W x - U V x||^2 over
calibration inputs instead: with Sigma = E[x x^T] = L L^T, take the best rank-r approximation of
W L (its top right singular vectors Q_r), then U = W L Q_r and V = Q_r^T L^-1.

Optimism (``with_optimism``): the proxy's error on row i, (W_i - U_i V) x, has spread
sigma_i = sqrt(r_i Sigma r_i^T) over calibration inputs (r_i the row's residual). Adding c sigma_i
to row i's score gives the rows the proxy knows least the benefit of the doubt, as an upper
confidence bound does: on SmolLM2, C source never seen in calibration, recall@50 at k' 3,584
0.987 -> 0.991 (c = 4, chosen on held-back calibration windows; benchmarks/head_optimism.py).
The spread itself is kept (``spread``): exact sampling bounds a tail row's logit by its score plus
a margin of spreads (``decode_bound``, hire.engine.sampling).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from hire import native
from hire.proxies.kernels import QuantizedGEMV
from hire.proxies.quantized_matrix import QuantizedMatrix
from hire.proxies.whiten import Whitening, second_moment, whitened


class BlockPack(NamedTuple):
    """U's int8 codes, row scales and row bias in block-major order for the native first pass
    (``block_select``): block b holds rows b, b + blocks, b + 2 blocks, ... (``hire.topk.local_topk``'s
    blocks), each block's rows one contiguous stretch, so a block is scored and selected in one go."""

    # (blocks, S/16, r/4, 16, 4) bytes (4-bit codes: r/8, two to a byte), S = rows / blocks padded to a multiple of 16
    codes: torch.Tensor
    scales: torch.Tensor  # (blocks, S) float32
    bias: torch.Tensor | None  # (blocks, S) float16, or None
    blocks: int
    rows: int  # V, the real rows (the rest of each block's S are padding)


def pack_blocks(codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, blocks: int,
                ops=None, bits: int = 8) -> BlockPack:
    """``codes`` (V, r) int8, ``scales`` (V,) float32, ``bias`` (V,) float16 or None -> a BlockPack.
    ``bits`` 4: the codes lie in [-8, 7] and are packed two to a byte (r in a multiple of 8).
    Needs V divisible by ``blocks`` and r in a multiple of 4. Where V / blocks is not a multiple of 16
    (Qwen's 151,936 rows in 128 blocks of 1,187) each block is padded to one with rows of zero codes
    and a NaN scale: block b's padding is rows V + b, V + b + blocks, ..., so its real rows keep their
    places. A NaN comes after every real score and padding after a block's real rows, so padding is
    never picked while ``per`` is at most V / blocks (``block_select`` checks). ``ops``: another
    build's torch.ops namespace (tests)."""
    n = codes.shape[0]
    if blocks < 1 or n % blocks:
        raise ValueError(f"the block-major first pass splits the {n} rows into equal blocks; {blocks} blocks do not")
    pad = (-(n // blocks) % 16) * blocks
    scales = scales.float()
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
        scales = torch.cat([scales, scales.new_full((pad,), float("nan"))])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(pad)])
    mod = ops or _native_ops()
    packed, block_scales, block_bias = mod.pack_lowrank_blocks(codes, scales.contiguous(), bias, blocks, bits)
    return BlockPack(packed, block_scales, block_bias if bias is not None else None, blocks, n)


def block_select(x: torch.Tensor, v: torch.Tensor, pack: BlockPack, per: int, with_union: bool = False,
                 ops=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first pass for B activations in one native call over U: z = V x (float64 sums, rounded to
    float32), z's int8 codes (one scale per activation), every row's score ``scale * (U z) + bias / z's
    scale`` and each block's best ``per`` rows (score descending, then row ascending; NaN last), read
    block by block. Every tile of U is read once for the B activations.
    Returns each activation's rows in ascending order and, with ``with_union``, their union (ascending).
    ``reference_block_select`` is the eager meaning.
    # x: (B, D), v: (r, D) -> rows (B, blocks * per) int64, union (m,) int64 or None"""
    stripe = pack.rows // pack.blocks
    if not 1 <= per <= stripe:
        raise ValueError(f"per must be in [1, {stripe}] (the rows of a block), got {per}")
    mod = ops or _native_ops()
    rows, union = mod.lowrank_select(x, v, pack.codes, pack.scales, pack.bias, per, with_union)
    return rows, (union if with_union else None)


def reference_block_select(x: torch.Tensor, v: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, blocks: int,
                           per: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What ``block_select`` selects, in eager torch, from the unpacked int8 ``codes`` (V, r): the same
    float32 operations on exact integer sums, and its order among equal scores (the lower row) and NaNs
    (after every real score; among them the lower row).
    # x: (B, D), v: (r, D) -> (B, blocks * per) int64, each row ascending"""
    z = (x.double() @ v.double().t()).float()  # (B, r): each sum of exact products, rounded once
    out = []
    for zb in z:
        zq, scale = native.quantize_activation(zb)
        sums = codes.to(torch.int64) @ zq.to(torch.int64)  # (V,) exact, below 2^24 in magnitude
        score = sums.float() * scales.float()
        if bias is not None:  # the kernel's units: the bias times 1 / z's scale, in float32
            score = score + bias.float() * (1 / torch.tensor(scale, dtype=torch.float32))
        cols = score.view(-1, blocks).t()  # (blocks, S): block b's rows b, b + blocks, ...
        nan = cols.isnan()
        order = cols.masked_fill(nan, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        order = order.gather(1, nan.gather(1, order).to(torch.int8).sort(dim=1, stable=True).indices)  # NaN last
        keep = order[:, :per] * blocks + torch.arange(blocks)[:, None]  # (blocks, per) row ids
        out.append(keep.reshape(-1).sort().values)
    return torch.stack(out)


def _native_ops():
    if not native.available():
        raise native.NativeUnavailableError(f"HiRE native kernels unavailable: {native.unavailable_reason()}")
    return torch.ops.hire


U_BITS = (4, 8, 16)  # U's storage: 4- and 8-bit codes with one scale per row, or float16

FIT_ROWS = 4096  # rows of W read at a time (in float64: 29 MB a slice at D = 896) by fit_ranks, with_optimism, scores


class LowRankProxy:
    """scores~ = U (V x) with U (n, r) stored in 4, 8 or 16 bits and V (r, D) in 16 bits."""

    kind = "lowrank"

    def __init__(self, u: torch.Tensor | QuantizedMatrix, v: torch.Tensor, bias: torch.Tensor | None = None,
                 spread: torch.Tensor | None = None):
        self.u = u  # (n, r): a float tensor, or a 4- or 8-bit QuantizedMatrix (one scale per row)
        self.v = v  # (r, D)
        self.bias = bias  # (n,) float16 added to each row's score (with_optimism), or None
        self.spread = spread  # (n,) float32: each row's proxy-error std over the calibration states, or None
        for name, t, dtype in (("row bias", bias, torch.float16), ("row spread", spread, torch.float32)):
            if t is not None and (t.shape != (u.shape[0],) or t.dtype != dtype):
                raise ValueError(f"the proxy's {name} must be ({u.shape[0]},) {dtype}, got {tuple(t.shape)} {t.dtype}")
        self.packed: torch.Tensor | None = None  # U for native.lowrank_block_topk (prepare_decode), when it applies
        self._blocked: dict[int, BlockPack | None] = {}  # U block-major per block count (block_pack), decode
        self._v: torch.Tensor | None = None  # the decode layout (prepare_decode)
        self._u: QuantizedGEMV | torch.Tensor | None = None
        self._four = False  # a 4-bit U on the block-major kernel (prepare_decode)

    @property
    def decode_kind(self) -> str:
        """The kernel of decode_scores' U product ("int8pack", "dequantize" or "dense")."""
        u = self._decode_u()
        return u.kind if isinstance(u, QuantizedGEMV) else "dense"

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        rank: int,
        states: torch.Tensor | None = None,
        u_bits: int = 16,
        ridge: float = 1e-4,
    ) -> "LowRankProxy":
        """Fit the factors; with ``states`` (N, D) the fit is activation-aware, else a plain SVD.

        # weight: (n, D), states: (N, D) -> U: (n, r), V: (r, D)
        """
        return next(cls.fit_ranks(weight, [rank], states, u_bits, ridge))

    @classmethod
    def fit_ranks(
        cls,
        weight: torch.Tensor,
        ranks: list[int] | tuple[int, ...],
        states: torch.Tensor | None = None,
        u_bits: int = 16,
        ridge: float = 1e-4,
        *,
        sigma: torch.Tensor | None = None,
        gram: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float64,
        whitening: Whitening | None = None,
    ) -> Iterator["LowRankProxy"]:
        """``from_weight`` for each rank of ``ranks``, from one eigendecomposition: the best rank-r
        subspaces of W L are nested, so every rank's factors are slices of the same eigenvectors.
        W is read a slice of rows at a time (in float64, never whole: a copy of a 1.5B model's head
        in float64 is 1.9 GB); ``weight`` may be anything sliced by rows with a ``shape``
        (hire.calibrate.states.HeadRows: a GGUF head dequantized a slice at a time). The proxies come
        one at a time as they are iterated (the arguments are checked and the eigendecomposition made
        at the call): a caller that keeps one rank at a time holds one U.

        ``sigma``: the states' second moment E[x x^T] (float64 (D, D)) in place of ``states`` (second
        moments add: hire.calibrate.auto fits one proxy per left-out domain from them); ``gram``: W^T W
        (``hire.proxies.whiten.head_gram``), when several fits share it; ``dtype``: of the product
        W (L Q) giving U (float32: 4x faster, for proxies that only estimate recall or time);
        ``whitening``: the decomposition itself (``hire.proxies.whiten.whitened``), made once for calls
        that fit other ranks under the same second moment, in place of ``states``, ``sigma`` and ``gram``.

        # weight: (n, D), states: (N, D) -> [U: (n, r), V: (r, D)] per rank
        """
        n, width = weight.shape
        for rank in ranks:
            if rank < 1 or rank > min(n, width):
                raise ValueError(
                    f"rank {rank} must be between 1 and min(rows, width) = {min(n, width)} for a {n}x{width} weight"
                )
        if u_bits not in U_BITS:
            raise ValueError(f"u_bits must be one of {U_BITS}, got {u_bits}")
        if whitening is None:
            whitening = whitened(weight, states, ridge, sigma=sigma, gram=gram)
        elif states is not None or sigma is not None:
            raise ValueError("give a whitening in place of states or sigma, not with them")
        elif whitening.chol.shape != (width, width):
            raise ValueError(f"the whitening is of width {whitening.chol.shape[0]}, the weight's is {width}")
        chol, eigvals, eigvecs = whitening

        def one_rank(rank: int) -> "LowRankProxy":  # its locals go when it returns
            q = eigvecs[:, -rank:].flip(-1)  # (D, r), strongest first
            # 4-bit codes with one scale per row: U's columns first brought to one size (column j's
            # sum of squares is eigenvalue j), that size moved into V (U V unchanged); else a row's
            # scale follows its first columns and the last ones round to 0 (recall@50 0.92 -> 0.99
            # on the held-out C of a 0.5B Qwen at rank 256, k' 8,192)
            size = (eigvals[-rank:].flip(-1).clamp_min(0) / n).sqrt() if u_bits == 4 else None
            if size is not None:
                size = torch.where(size > 0, size, 1.0)
            lq = chol @ q if size is None else chol @ q / size  # U = W L Q
            # U a slice of rows at a time, each stored as it comes (one scale per row: a slice's codes
            # are the whole U's), never whole in float32 (155 MB at 152k x 256)
            parts: list = []
            lq = lq.to(dtype)
            for start in range(0, n, FIT_ROWS):
                u = (weight[start : start + FIT_ROWS].detach().to(dtype) @ lq).float()
                parts.append(u.to(torch.float16) if u_bits == 16
                             else QuantizedMatrix.from_weight(u, bits=u_bits, group_size=rank))
                del u
            u_store: torch.Tensor | QuantizedMatrix
            if u_bits == 16:
                u_store = torch.cat(parts)
            else:
                u_store = QuantizedMatrix(torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]),
                                          u_bits, parts[0].group_size, rank)
            del parts
            # V = Q^T L^-1, i.e. V^T solves L^T Y = Q
            v = torch.linalg.solve_triangular(chol.t(), q, upper=True).t()  # (r, D)
            if size is not None:
                v = v * size[:, None]
            return cls(u_store, v.to(torch.float16))

        def each_rank():  # suspended between ranks holding no U: a caller drawing from several at once (folds)
            for rank in ranks:
                yield one_rank(rank)

        return each_rank()

    @property
    def rank(self) -> int:
        return self.v.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.v.shape[1])

    def take_rows(self, rows: torch.Tensor) -> "LowRankProxy":
        """This proxy restricted to ``rows``: U's rows, the shared V.  # rows: (m,)"""
        u = self.u.take_rows(rows) if isinstance(self.u, QuantizedMatrix) else self.u.index_select(0, rows).contiguous()
        bias, spread = (None if t is None else t.index_select(0, rows).contiguous() for t in (self.bias, self.spread))
        return LowRankProxy(u, self.v, bias, spread)

    def dense_u(self) -> torch.Tensor:
        """U in float32.  # -> (n, r)"""
        return self.u.dequantize(dtype=torch.float32) if isinstance(self.u, QuantizedMatrix) else self.u.float()

    def with_optimism(self, weight: torch.Tensor, states: torch.Tensor, c: float) -> "LowRankProxy":
        """This proxy with ``c`` times each row's error spread over ``states`` added to its score
        (see the module docstring); c = 0 drops the bias. The spread is kept either way (``spread``).
        ``weight``: as ``fit_ranks`` reads it, a slice of rows at a time.
        # weight: (n, D), states: (N, D)"""
        if c < 0:
            raise ValueError(f"optimism must be >= 0, got {c}")
        sigma = second_moment(states)  # (D, D)
        spread = torch.empty(weight.shape[0], dtype=torch.float64)
        v = self.v.double()
        for start in range(0, weight.shape[0], FIT_ROWS):  # residual rows r_i = W_i - U_i V, a slice at a time
            u = self._u_slice(start, min(start + FIT_ROWS, weight.shape[0]), torch.float64)
            r = weight[start : start + FIT_ROWS].double() - u @ v
            spread[start : start + r.shape[0]] = ((r @ sigma) * r).sum(-1).clamp_min(0).sqrt()
        return LowRankProxy(self.u, self.v, (c * spread).to(torch.float16) if c else None, spread.float())

    def with_spread(self, spread: torch.Tensor) -> "LowRankProxy":
        """This proxy with its rows' error spread known (a proxy saved before the spread was kept:
        its optimism bias divided by its optimism).  # spread: (n,)"""
        return LowRankProxy(self.u, self.v, self.bias, spread.float().contiguous())

    def _u_rows(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        if isinstance(self.u, QuantizedMatrix):
            return self.u.dequantize(rows, dtype=dtype)
        return self.u.index_select(0, rows).to(dtype)

    def _u_slice(self, start: int, stop: int, dtype) -> torch.Tensor:
        """U's rows start:stop in ``dtype`` (a float U's a view where the dtype is its own)."""
        if isinstance(self.u, QuantizedMatrix):
            return self.u.dequantize(torch.arange(start, stop), dtype=dtype)
        return self.u[start:stop].to(dtype)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's score, U read (and converted to ``x``'s dtype) ``FIT_ROWS`` rows at a time: never
        a whole float copy of U (117 MB for a 152k x 192 U in float32, twice that while dequantizing).
        # x: (N, D) -> (N, n)"""
        z = x @ self.v.t().to(x.dtype)  # (N, r)
        n = self.u.shape[0]
        out = torch.empty(x.shape[0], n, dtype=z.dtype)
        for start in range(0, n, FIT_ROWS):
            stop = min(n, start + FIT_ROWS)
            out[:, start:stop] = z @ self._u_slice(start, stop, x.dtype).t()
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def scores_rows(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        # x: (N, D), idx: (N, m) -> (N, m)
        z = x @ self.v.t().to(x.dtype)  # (N, r)
        u = self._u_rows(idx.reshape(-1), x.dtype).reshape(*idx.shape, -1)  # (N, m, r)
        out = torch.einsum("nmr,nr->nm", u, z)
        return out if self.bias is None else out + self.bias.to(out.dtype)[idx]

    def prepare_decode(self, dtype: torch.dtype) -> None:
        self._v = self.v.to(dtype).contiguous()
        self.packed = None
        self._blocked = {}
        self._u = None
        u = self.u
        four_bit = isinstance(u, QuantizedMatrix) and u.bits == 4
        # 4-bit codes with one scale per row and a rank in 8s: the block-major kernel, decided now (a proxy
        # prepared inside native.disabled() stays eager)
        self._four = four_bit and u.group_size >= self.rank and self.rank % 8 == 0 and native.available()
        if four_bit:
            return  # the first pass reads the 4-bit codes (block_pack); U's GEMV is made if decode_scores needs it
        self._u = self._decode_u()
        if isinstance(self._u, QuantizedGEMV) and self._u.kind == "int8pack" and self.u.shape[0] % 16 == 0 \
                and self.rank % 4 == 0 and native.usable(self._u.codes):
            self.packed = native.pack_lowrank(self._u.codes)

    def _decode_u(self) -> QuantizedGEMV | torch.Tensor:
        """U as decode_scores multiplies it (in the decode dtype), made on first use."""
        if self._u is None:
            if self._v is None:
                raise RuntimeError("the low-rank proxy has no decode layout yet: call prepare_decode(dtype) first")
            dtype = self._v.dtype
            self._u = QuantizedGEMV(self.u, dtype) if isinstance(self.u, QuantizedMatrix) else self.u.to(dtype)
        return self._u

    @property
    def decode_v(self) -> torch.Tensor:
        """V in the decode dtype (prepare_decode).  # (r, D)"""
        return self._v

    @property
    def row_scales(self) -> torch.Tensor:
        """U's float32 row scales where U is int8 on the decode kernels (prepare_decode).  # (n,)"""
        return self._u.row_scales

    def block_pack(self, blocks: int) -> BlockPack | None:
        """U block-major for ``blocks`` blocks (``block_select``), made on the first call after
        prepare_decode; None where it does not apply (no 4- or 8-bit codes on the kernels, or the rows
        do not split into equal blocks)."""
        if blocks not in self._blocked:
            pack = None
            if self.block_major(blocks):
                if self.packed is not None:  # 8-bit
                    pack = pack_blocks(self._u.codes, self._u.row_scales, self.bias, blocks)
                else:
                    u = self.u
                    codes = u.codes(u.packed)[:, : self.rank].contiguous()
                    pack = pack_blocks(codes, u.scales[:, 0].float(), self.bias, blocks, bits=4)
            self._blocked[blocks] = pack
        return self._blocked[blocks]

    def block_major(self, blocks: int) -> bool:
        """Whether the first pass over ``blocks`` blocks runs block-major (``block_pack`` applies:
        8-bit codes on the kernels, or 4-bit codes with one scale per row and a rank in 8s where the
        kernels are built; equal blocks), without making the pack."""
        n = self.u.shape[0]
        if not (blocks > 0 and n % blocks == 0 and self._v is not None):
            return False
        return self.packed is not None or self._four

    def fused_first_pass(self, blocks: int) -> bool:
        """Whether ``decode_local_topk`` runs natively (block-major, or the 8-bit row-major kernel)."""
        return blocks > 0 and (self.packed is not None or self.block_major(blocks))

    def first_pass_kernel(self, blocks: int) -> str:
        """The native kernel ``decode_local_topk`` runs for ``blocks`` blocks."""
        return "lowrank_select" if self.block_major(blocks) else "lowrank_block_topk"

    def decode_local_topk(self, x: torch.Tensor, k: int, blocks: int) -> torch.Tensor:
        """``local_topk(decode_scores(x), k, blocks)`` as a set, in one native pass over U's codes (with
        x's low-rank projection quantized to int8); needs ``packed``. With the block-major pack
        (``block_pack``: z, scores and selection in one call) the rows come in ascending order, else
        block by block.  # x: (1, D) -> (1, k)"""
        pack = self.block_pack(blocks)
        if pack is not None:
            return block_select(x.reshape(1, -1), self._v, pack, k // blocks)[0]
        z = torch.nn.functional.linear(x.to(self._v.dtype), self._v)  # (1, r)
        return native.lowrank_block_topk(z, self.packed, self._u.row_scales, blocks, k // blocks, self.bias).view(1, -1)

    def decode_local_topk_batch(self, x: torch.Tensor, k: int, blocks: int,
                                with_union: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``decode_local_topk`` for B activations, U read once for all of them (``block_select``), and
        the union of their rows (None without ``with_union``); needs ``block_pack(blocks)``.
        # x: (B, D) -> rows (B, k), union (m,), ascending"""
        pack = self.block_pack(blocks)
        if pack is None:
            raise ValueError(f"this proxy has no block-major pack for {blocks} blocks (block_pack)")
        return block_select(x, self._v, pack, k // blocks, with_union=with_union)

    def decode_scores(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``bias=False``: U (V x) alone, without the optimism bias.  # x: (1, D) -> (1, n)"""
        z = torch.nn.functional.linear(x.to(self._v.dtype), self._v)  # (1, r)
        u = self._decode_u()
        out = u(z) if callable(u) else torch.nn.functional.linear(z, u)
        return out if self.bias is None or not bias else out + self.bias.to(out.dtype)

    def decode_bound(self, x: torch.Tensor, margin: float) -> torch.Tensor:
        """Each row's score plus ``margin`` error spreads: an upper bound on its exact logit wherever
        the proxy's error stays within that many spreads (the optimism bias, c spreads, is replaced,
        not added to). Needs ``spread``.  # x: (1, D) -> float32 (1, n)"""
        if self.spread is None:
            raise ValueError("this low-rank proxy has no row spreads: refit it with optimism "
                             "(LowRankProxy.with_optimism) or use Cascade.decode_bound's fallback")
        return self.decode_scores(x, bias=False).float() + margin * self.spread

    @staticmethod
    def u_nbytes(rows: int, rank: int, bits: int) -> int:
        """Bytes of a ``rows`` x ``rank`` U stored in ``bits`` (``fit_ranks``: 4 or 8 bits with one 16-bit
        scale per row, or float16), without fitting it."""
        return rows * rank * 2 if bits == 16 else QuantizedMatrix.nbytes_for(rows, rank, bits, rank)

    def nbytes(self, rows: int | None = None) -> int:
        n = self.u.shape[0] if rows is None else rows
        u_bytes = self.u.nbytes(n) if isinstance(self.u, QuantizedMatrix) else n * self.rank * 2
        return u_bytes + self.v.numel() * 2 + (0 if self.bias is None else n * 2)

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {prefix + "v": self.v}
        if self.bias is not None:
            out[prefix + "bias"] = self.bias
        if self.spread is not None:
            out[prefix + "spread"] = self.spread
        if isinstance(self.u, QuantizedMatrix):
            out.update(self.u.state_dict(prefix + "u."))
        else:
            out[prefix + "u"] = self.u
        return out

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "") -> "LowRankProxy":
        u = state[prefix + "u"] if prefix + "u" in state else QuantizedMatrix.from_state(state, prefix + "u.")
        return cls(u, state[prefix + "v"], state.get(prefix + "bias"), state.get(prefix + "spread"))
