"""GGUF block formats -> one affine-code layout the native kernels read (lossless).

Every supported GGUF format is, per group of ``group`` columns (16 or 32), ``value = scale *
(code - zero) + min`` with unsigned ``bits``-bit codes: ``zero = 2**(bits-1)`` for the symmetric
formats (Q8_0, Q4_0, Q5_0, Q6_K, Q3_K, IQ4_NL, IQ4_XS; no ``min``), ``zero = 0`` with a ``min`` for
the affine ones (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K). Q2_K's and Q3_K's 2- and 3-bit codes are held as
4-bit ones (lossless, in more bytes than the file's); the IQ4 formats' codes are the 8-bit values
``IQ4_KVALUES + 128`` (zero 128), kept as their 4-bit indices (``LUT4``) that the kernels look up.
``unpack`` reads a format's blocks into codes, scales and mins exactly as the ``gguf`` package's
dequantiser combines them (tests hold them to it), and ``pack_codes`` stores the
codes in the kernel's planes, per 64-column chunk (``chunk_bytes``):

* a nibble plane of 32 bytes: byte i holds column i in its low nibble and column i + 32 in its high
  one, so one 32-byte load splits into the chunk's two 32-column groups;
* 5-bit codes add a 64-bit mask of the fifth bits (bit i: column i);
* 6-bit codes add 16 bytes of the top two bits: byte i holds columns i, i+16, i+32, i+48 (two bits
  each, lowest first);
* 8-bit codes are 64 plain bytes.

Scales and mins are float16 where that is exact for the whole tensor (the legacy formats store
float16). The K formats (``K_FORMATS``) keep their own two levels instead: an int8 sub-scale (and
sub-min) per group and a float16 super-scale (and super-min) per 256 columns (``k_scale_parts``), so
the kernels read no more bytes than the file (Q6_K: its 210 bytes per 256 columns; Q4_K: 148 for
144, its 12 bytes of 6-bit scales and mins unpacked to 16); scale = super * sub, exactly the float32
product ``gguf``'s dequantiser forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 64  # columns per kernel chunk: rows are padded to a multiple of it


@dataclass(frozen=True)
class BlockFormat:
    name: str
    block: int  # columns per GGUF block
    nbytes: int  # bytes per GGUF block
    bits: int
    group: int  # columns sharing one scale (and min)
    has_min: bool


FORMATS = {
    f.name: f
    for f in (
        BlockFormat("Q8_0", 32, 34, 8, 32, False),
        BlockFormat("Q4_0", 32, 18, 4, 32, False),
        BlockFormat("Q4_1", 32, 20, 4, 32, True),
        BlockFormat("Q5_0", 32, 22, 5, 32, False),
        BlockFormat("Q5_1", 32, 24, 5, 32, True),
        BlockFormat("Q4_K", 256, 144, 4, 32, True),
        BlockFormat("Q5_K", 256, 176, 5, 32, True),
        BlockFormat("Q6_K", 256, 210, 6, 16, False),
        # 3-bit codes (values -4..3) held as 4-bit codes with zero 8: 146 bytes per 110 of the file
        BlockFormat("Q3_K", 256, 110, 4, 16, False),
        # 2-bit codes held as 4-bit ones, a 4-bit scale and min per 16 columns: 164 bytes per 84
        BlockFormat("Q2_K", 256, 84, 4, 16, True),
        # the non-linear 4-bit formats: a 4-bit index into IQ4_KVALUES, kept as the index (LUT4) and
        # read as the 8-bit code value + 128 (zero 128) through a table: the file's bytes
        BlockFormat("IQ4_NL", 32, 18, 9, 32, False),
        BlockFormat("IQ4_XS", 256, 136, 9, 32, False),
    )
}
K_FORMATS = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS")  # two-level scales: int8 per group x float16 per SUPER columns
# IQ4_NL's and IQ4_XS's 16 values (ggml's kvalues_iq4nl), each a signed byte
IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int16)
LUT4 = 9  # the "bits" of IQ4's codes: a nibble plane of indices, read as 8-bit codes IQ4_KVALUES + 128
_LUT4_CODES = (IQ4_KVALUES + 128).astype(np.uint8)
_LUT4_INDEX = np.full(256, 255, np.uint8)
_LUT4_INDEX[_LUT4_CODES] = np.arange(16, dtype=np.uint8)
_LUT4_INDEX[0] = 0  # a row's padding columns (code 0 under a zero scale) as any index
SUPER = 256  # columns per super-block of the K formats
FLOAT_FORMATS = ("F32", "F16", "BF16")  # kept as torch tensors (float32 for F32, else their own dtype)
SUPPORTED = tuple(FORMATS) + FLOAT_FORMATS


def chunk_bytes(bits: int) -> int:
    """Bytes per 64-column chunk of ``bits``-bit codes in the kernel's planes."""
    return {4: 32, 5: 40, 6: 48, 8: 64, LUT4: 32}[bits]


def zero_point(bits: int, has_min: bool) -> int:
    return 0 if has_min else 128 if bits == LUT4 else 1 << (bits - 1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32 columns, legacy order (low nibbles: columns 0-15, high: 16-31)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The K formats' 12 bytes -> eight 6-bit scales and mins (gguf's own unpacking)."""
    from gguf.quants import Q4_K

    sc, m = Q4_K.get_scale_min(raw)
    return sc.reshape(raw.shape[0], 8).astype(np.float32), m.reshape(raw.shape[0], 8).astype(np.float32)


def _q3k_scales(raw: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes -> its sixteen 6-bit scales minus 32, int8 (gguf's own bit order)."""
    low = (raw[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(-1, 16) & 0x0F
    high = (raw[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(-1, 16) & 0x03
    return ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8)


def _iq4xs_scales(raw: np.ndarray) -> np.ndarray:
    """IQ4_XS's 6 bytes (a 16-bit word of high bits, then 4 bytes of low nibbles) -> its eight 6-bit
    scales minus 32, int8."""
    high = np.ascontiguousarray(raw[:, :2]).view(np.uint16).reshape(-1, 1) >> (2 * np.arange(8, dtype=np.uint16))
    low = (raw[:, 2:6].reshape(-1, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(-1, 8) & 0x0F
    return ((low | ((high & 0x03).astype(np.uint8) << 4)).astype(np.int16) - 32).astype(np.int8)


def unpack(fmt: BlockFormat, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(codes uint8 (n, block), scales float32 (n, block/group), mins float32 or None)`` of
    ``blocks`` (n, nbytes) uint8, with value = scale * (code - zero) + min."""
    n = blocks.shape[0]
    b = blocks
    if fmt.name == "Q8_0":
        return (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), _f16(b[:, :2]), None
    if fmt.name == "Q4_0":
        return _nibbles(b[:, 2:]), _f16(b[:, :2]), None
    if fmt.name == "Q4_1":
        return _nibbles(b[:, 4:]), _f16(b[:, :2]), _f16(b[:, 2:4])
    if fmt.name in ("Q5_0", "Q5_1"):
        off = 2 if fmt.name == "Q5_0" else 4
        qh = np.ascontiguousarray(b[:, off : off + 4]).view(np.uint32)  # (n, 1)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = _nibbles(b[:, off + 4 :]) | (high << 4)
        return codes, _f16(b[:, :2]), (None if fmt.name == "Q5_0" else _f16(b[:, 2:4]))
    if fmt.name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, m = _k_scales(b[:, 4:16])
        if fmt.name == "Q4_K":
            qs, qh = b[:, 16:144], None
        else:
            qh, qs = b[:, 16:48], b[:, 48:176]
        # 64 columns per 32 bytes: low nibbles the first 32, high nibbles the next 32
        qs = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 0x0F).reshape(n, 256)
        if qh is not None:
            high = qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            codes = codes | ((high & 1).reshape(n, 256) << 4)
        return codes, d * sc, -(dmin * m)
    if fmt.name == "Q6_K":
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        low = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        low = (low & 0x0F).reshape(n, 2, 4, 32)
        high = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        high = (high & 0x03).reshape(n, 2, 4, 32)
        codes = (low | (high << 4)).reshape(n, 256)
        return codes, _f16(d) * sc.view(np.int8).astype(np.float32), None
    if fmt.name == "Q3_K":
        hmask, qs, d = b[:, :32], b[:, 32:96], _f16(b[:, 108:110])
        # column 32 j + i (j < 8): bits 2(j % 4)..+1 of qs byte 32 (j // 4) + i, and bit j of hmask byte i
        low = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        high = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        # the value is low - 4 where the high bit is clear: code = value + 8 = low + 4 (high bit) + 4
        codes = low.reshape(n, 256) + (high.reshape(n, 256) << 2) + 4
        return codes.astype(np.uint8), d * _q3k_scales(b[:, 96:108]).astype(np.float32), None
    if fmt.name == "Q2_K":
        sc, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        # column 128 j + 32 k + i: bits 2k..2k+1 of qs byte 32 j + i
        codes = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        return codes.reshape(n, 256), d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))
    if fmt.name == "IQ4_NL":
        idx = _nibbles(b[:, 2:])
        return (IQ4_KVALUES[idx] + 128).astype(np.uint8), _f16(b[:, :2]), None
    if fmt.name == "IQ4_XS":
        d = _f16(b[:, :2])
        # per 32 columns: low nibbles the first 16, high nibbles the next 16 (as the legacy formats)
        idx = _nibbles(b[:, 8:136].reshape(n * 8, 16)).reshape(n, 256)
        return (IQ4_KVALUES[idx] + 128).astype(np.uint8), d * _iq4xs_scales(b[:, 2:8]).astype(np.float32), None
    raise ValueError(f"no unpacking for {fmt.name}")


def k_scale_parts(fmt: BlockFormat, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A K format's two scale levels of ``blocks`` (n, nbytes): ``(sub int8 (n, 256 / group), sub_min
    int8 (n, 256 / group) or None, supers float16 (n, 1) or (n, 2))``, with scale = supers[:, 0] * sub
    and min = supers[:, 1] * sub_min (supers[:, 1] is the block's -dmin), both in float32 as ``unpack``
    gives them."""
    b = blocks
    if fmt.name in ("Q4_K", "Q5_K"):
        sc, m = _k_scales(b[:, 4:16])
        neg_dmin = -(np.ascontiguousarray(b[:, 2:4]).view(np.float16))
        supers = np.concatenate([np.ascontiguousarray(b[:, :2]).view(np.float16), neg_dmin], axis=1)
        return sc.astype(np.int8), m.astype(np.int8), supers
    if fmt.name == "Q6_K":
        return np.ascontiguousarray(b[:, 192:208]).view(np.int8), None, np.ascontiguousarray(b[:, 208:210]).view(np.float16)
    if fmt.name == "Q2_K":
        supers = np.concatenate([np.ascontiguousarray(b[:, 80:82]).view(np.float16),
                                 -(np.ascontiguousarray(b[:, 82:84]).view(np.float16))], axis=1)
        return (b[:, :16] & 0x0F).astype(np.int8), (b[:, :16] >> 4).astype(np.int8), supers
    if fmt.name == "IQ4_XS":
        return _iq4xs_scales(b[:, 2:8]), None, np.ascontiguousarray(b[:, :2]).view(np.float16)
    if fmt.name == "Q3_K":
        return _q3k_scales(b[:, 96:108]), None, np.ascontiguousarray(b[:, 108:110]).view(np.float16)
    raise ValueError(f"{fmt.name} has one level of scales")


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, cols) with cols a multiple of 64 -> the kernel's planes (rows, cols/64 * chunk_bytes)."""
    rows, cols = codes.shape
    c = codes.reshape(rows, cols // CHUNK, CHUNK)
    if bits == LUT4:  # IQ4's 8-bit codes back to their 4-bit indices
        index = _LUT4_INDEX[c]
        if (index == 255).any():
            raise ValueError("IQ4 codes must be IQ4_KVALUES + 128")
        c = index
    elif bits == 8:
        return np.ascontiguousarray(c).reshape(rows, -1)
    low = c & 0x0F
    planes = [low[..., :32] | (low[..., 32:] << 4)]
    if bits == 5:
        planes.append(np.packbits((c >> 4) & 1, axis=-1, bitorder="little"))
    elif bits == 6:
        top = (c >> 4) & 0x03
        planes.append(top[..., :16] | (top[..., 16:32] << 2) | (top[..., 32:48] << 4) | (top[..., 48:] << 6))
    return np.concatenate(planes, axis=-1).reshape(rows, -1)


def unpack_codes(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Inverse of ``pack_codes`` (for tests and the eager reference)."""
    rows = packed.shape[0]
    p = packed.reshape(rows, -1, chunk_bytes(bits))
    if bits == 8:
        return p.reshape(rows, -1)[:, :cols]
    nib = p[..., :32]
    c = np.concatenate([nib & 0x0F, nib >> 4], axis=-1)
    if bits == LUT4:
        return _LUT4_CODES[c].reshape(rows, -1)[:, :cols]
    if bits == 5:
        c = c | (np.unpackbits(p[..., 32:40], axis=-1, bitorder="little") << 4)
    elif bits == 6:
        top = p[..., 32:48]
        c = c | (np.concatenate([(top >> s) & 0x03 for s in (0, 2, 4, 6)], axis=-1) << 4)
    return c.reshape(rows, -1)[:, :cols]


def compact_scales(values: np.ndarray) -> np.ndarray:
    """float16 when exact for every value, else float32."""
    half = values.astype(np.float16)
    if np.array_equal(half.astype(np.float32), values, equal_nan=False) and np.isfinite(half).all():
        return half
    return values.astype(np.float32)
