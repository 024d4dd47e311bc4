"""The native kernels never read memory they were not given: every input they index is checked
(a clear error naming the argument and what was expected), every output value is written, and
NaN scores have one defined order (last). Each test here failed on the kernels before these checks,
and runs on every SIMD build the machine has (the default one and the variants of test_native)."""

import pytest
import torch

from hire import native
from hire.native import build
from hire.topk import local_topk
from test_native import VARIANTS, _on

BUILT = native.available()
needs_kernels = pytest.mark.skipif(not BUILT, reason=f"native kernels: {native.unavailable_reason()}")


@pytest.fixture(scope="module", params=["native", "avx2", pytest.param("avx512novnni", marks=pytest.mark.slow),
                                        pytest.param("scalar", marks=pytest.mark.slow)])
def library(request):
    """(torch.ops namespace, torch.classes namespace) of the default build or of a SIMD variant."""
    name = request.param
    if not BUILT:
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    if name == "native":
        return torch.ops.hire, torch.classes.hire
    flags, runs_here = VARIANTS[name]
    if not runs_here:
        pytest.skip(f"the {name} build needs an x86 CPU with its instructions")
    build.build_variant(name, flags)
    namespace = build.variant_namespace(name)
    return getattr(torch.ops, namespace), getattr(torch.classes, namespace)


# --- rows_dot -------------------------------------------------------------------------------------

@pytest.mark.parametrize("parts", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rows_dot_without_an_activation_writes_every_part(library, dtype, parts):
    """Every (row, part) product, not just part 0: the output was torch.empty, so the other parts were
    whatever that memory held."""
    g = torch.Generator().manual_seed(parts)
    for n, d, c in [(9, 7, 5), (40, 16, 40), (70, 33, 90)]:
        w = torch.randn(n, parts * d, generator=g).to(dtype)
        x = torch.randn(1, d, generator=g)
        idx = torch.randint(0, n, (c,), generator=g)
        torch.empty(c * parts * 4).fill_(float("nan"))  # a freed block of NaNs for the output to reuse
        with _on(library[0]):
            got = native.rows_dot(x, w, idx, parts=parts)
        want = native.reference_rows_dot(x, w, idx, parts=parts)
        assert got.shape == want.shape == (c, parts)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * d)


def _int8_case(n=12, d=8):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (n, d), generator=g, dtype=torch.int8)
    return torch.randn(1, d, generator=g), w, torch.tensor([0, 5, 11])


def test_rows_dot_refuses_row_scales_it_cannot_read(library):
    x, w, idx = _int8_case()
    strided = torch.rand(2 * w.shape[0])[::2]  # one value per row, every other float: not contiguous
    with _on(library[0]), pytest.raises(RuntimeError, match=r"scales must be a contiguous float32 \(12,\) tensor"):
        native.rows_dot(x, w, idx, strided)
    with _on(library[0]), pytest.raises(RuntimeError, match=r"scales must be .*\(12,\).*got shape \[12, 1\]"):
        native.rows_dot(x, w, idx, torch.rand(w.shape[0], 1))
    with _on(library[0]), pytest.raises(RuntimeError, match=r"scales must be .*float32.*Double"):
        native.rows_dot(x, w, idx, torch.rand(w.shape[0], dtype=torch.float64))
    # the same values, contiguous: accepted, and what the eager reference computes
    scales = strided.contiguous()
    with _on(library[0]):
        got = native.rows_dot(x, w, idx, scales)
    torch.testing.assert_close(got, native.reference_rows_dot(x, w, idx, scales))


# --- DecodeModel ----------------------------------------------------------------------------------

HQ, HKV, HD, DIM, NEURONS, SEQ = 4, 2, 8, 16, 24, 8


def _model(classes, *, dims=(HQ, HKV, HD, DIM), seq=SEQ, cache_dtype=torch.float32, v_dtype=None, tables=None):
    """A DecodeModel over random tensors, without layers (add them with _layer)."""
    hq, hkv, hd, dim = dims
    k = torch.zeros(1, max(hkv, 1), seq, hd, dtype=cache_dtype)
    v = torch.zeros(1, max(hkv, 1), seq, hd, dtype=v_dtype or cache_dtype)
    if tables is None:
        tables = [(torch.randn(seq, hd), torch.randn(seq, hd))]
    cos, sin = [c for c, _ in tables], [s for _, s in tables]
    return classes.DecodeModel(list(dims), hd ** -0.5, 1e-6, k, v, cos, sin, torch.ones(dim))


def _layer_args(proxy=None, rope=0, sliding=0, qkv_dtype=torch.float32):
    """add_layer's arguments for one dense layer (or a sparse one over the `proxy` matrix)."""
    g = torch.Generator().manual_seed(1)
    nq, nkv = HQ * HD, HKV * HD
    ones, empty = torch.ones(DIM), torch.empty(0)
    qkv = (torch.randn(nq + 2 * nkv, DIM, generator=g) / DIM ** 0.5).to(qkv_dtype)
    o = torch.randn(DIM, nq, generator=g) / nq ** 0.5
    rows = torch.randn(NEURONS, 3 * DIM, generator=g) / DIM ** 0.5
    keep, kind = (NEURONS, 0) if proxy is None else (NEURONS // 2, 2)
    tensors = [qkv, empty, o, ones, empty, ones, empty, empty, empty, rows,
               empty if proxy is None else proxy, empty]
    return tensors, [rope, sliding, native.ACTIVATIONS["silu"], 2, keep, kind, 0]


def test_decode_model_checks_its_dimensions(library):
    classes = library[1]
    with pytest.raises(RuntimeError, match="kv heads must be positive, got 0"):
        _model(classes, dims=(HQ, 0, HD, DIM))  # was a division by zero (SIGFPE)
    with pytest.raises(RuntimeError, match="query heads must be positive"):
        _model(classes, dims=(0, HKV, HD, DIM))
    with pytest.raises(RuntimeError, match="head dim must be even"):
        _model(classes, dims=(HQ, HKV, 7, DIM), tables=[(torch.randn(SEQ, 7), torch.randn(SEQ, 7))])


def test_decode_model_checks_its_rotary_tables(library):
    classes = library[1]
    cos = torch.randn(SEQ, HD)
    bad_sin = {
        "dtype": (torch.randn(SEQ, HD).half(), r"sin table 0 must be float32.*Half"),
        "short": (torch.randn(SEQ - 1, HD), rf"sin table 0 must be .*\({SEQ}\+, {HD}\).*\[{SEQ - 1}, {HD}\]"),
        "width": (torch.randn(SEQ, HD // 2), rf"sin table 0 must be .*\[{SEQ}, {HD // 2}\]"),
        "strided": (torch.randn(HD, SEQ).t(), "sin table 0 must be .*contiguous"),
        "1-D": (torch.randn(SEQ * HD), "sin table 0 must be .*2-D"),
    }
    for case, (sin, message) in bad_sin.items():
        with pytest.raises(RuntimeError, match=message):
            _model(classes, tables=[(cos, sin)])
    with pytest.raises(RuntimeError, match=r"cos table 1 must be float32.*BFloat16"):
        _model(classes, tables=[(cos, cos), (cos.bfloat16(), cos)])


def test_decode_model_checks_its_caches(library):
    classes = library[1]
    with pytest.raises(RuntimeError, match="the v cache must have the k cache's dtype"):
        _model(classes, cache_dtype=torch.float16, v_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="the caches must be float32, float16 or bfloat16.*Double"):
        _model(classes, cache_dtype=torch.float64)


def test_decode_positions_are_checked_against_every_rotary_table(library):
    """step_batch's caches may be longer than the model's: a position must fit every rotary table,
    not only the first (a layer on a shorter table read past its end)."""
    classes = library[1]
    long, short = SEQ * 2, SEQ
    tables = [(torch.randn(long, HD), torch.randn(long, HD)), (torch.randn(short, HD), torch.randn(short, HD))]
    model = _model(classes, tables=tables)
    model.add_layer(*_layer_args(rope=1))
    h = torch.randn(1, DIM)
    k_slots = torch.zeros(1, 1, HKV, long, HD)
    v_slots = torch.zeros_like(k_slots)
    out = model.step_batch(h, torch.tensor([short - 1]), torch.tensor([0]), k_slots, v_slots)
    assert out.shape == (1, DIM) and torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match=rf"position {short} is past rotary table 1's {short} positions"):
        model.step_batch(h, torch.tensor([short]), torch.tensor([0]), k_slots, v_slots)


def test_decode_layers_check_their_matrices(library):
    classes = library[1]
    model = _model(classes)
    good = torch.randn(2 * NEURONS, DIM)
    model.add_layer(*_layer_args(proxy=good))  # a sparse layer on a matrix proxy: accepted
    with pytest.raises(RuntimeError, match=r"the proxy matrix must be float32, float16 or bfloat16.*Char"):
        _model(classes).add_layer(*_layer_args(proxy=good.to(torch.int8)))
    with pytest.raises(RuntimeError, match=r"the proxy matrix must be .*contiguous rows.*strides \[1, 48\]"):
        _model(classes).add_layer(*_layer_args(proxy=torch.randn(DIM, 2 * NEURONS).t()))
    with pytest.raises(RuntimeError, match=r"qkv must be float32, float16 or bfloat16.*Char"):
        _model(classes).add_layer(*_layer_args(qkv_dtype=torch.int8))
    with pytest.raises(RuntimeError, match="sliding window must be >= 0"):
        _model(classes).add_layer(*_layer_args(sliding=-4))


# --- the head's first pass: NaN scores ------------------------------------------------------------

def _head_case(seed, rows=1024, rank=16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, rank), generator=g, dtype=torch.int8)
    return codes, torch.rand(rows, generator=g) / 100 + 1e-3, torch.randn(1, rank, generator=g)


@pytest.mark.parametrize("blocks, per", [(16, 4), (64, 8), (128, 2)])
def test_nan_scores_come_last_in_the_head_first_pass(library, blocks, per):
    """Rows whose score is NaN (a NaN row scale or bias) are never kept over a real score, the kernel
    and its eager reference (hire.topk.local_topk) keep the same rows, and the result is the same
    on every call."""
    ops = library[0]
    for seed, fraction in enumerate([0.05, 0.5, 0.9]):
        codes, scales, z = _head_case(seed)
        nan_rows = torch.rand(scales.shape[0], generator=torch.Generator().manual_seed(seed)) < fraction
        scales[nan_rows] = float("nan")
        real_per_block = (~nan_rows).view(-1, blocks).sum(0)  # (blocks,)
        with _on(ops):
            packed = native.pack_lowrank(codes)
            got = native.lowrank_block_topk(z, packed, scales, blocks, per)
            again = native.lowrank_block_topk(z, packed, scales, blocks, per)
        assert torch.equal(got, again)
        kept_nan = nan_rows[got].view(blocks, per).sum(1)  # (blocks,) kernel output is block-major
        # a block keeps a NaN row only when it has fewer than `per` real ones
        assert torch.equal(kept_nan, (per - real_per_block).clamp(min=0))
        want = native.reference_lowrank_block_topk(z, codes, scales, blocks, per)
        if (real_per_block >= per).all():  # otherwise both choose among NaNs, in their own order
            assert sorted(got.tolist()) == sorted(want.tolist())
        assert not nan_rows[want].any() or (real_per_block < per).any()


def test_an_all_nan_head_keeps_the_lowest_rows_of_each_block(library):
    ops = library[0]
    codes, scales, z = _head_case(3, rows=256)
    scales[:] = float("nan")
    with _on(ops):
        got = native.lowrank_block_topk(z, native.pack_lowrank(codes), scales, 16, 4)
    want = (torch.arange(4)[None, :] * 16 + torch.arange(16)[:, None]).reshape(-1)  # block b: b, b+16, ...
    assert torch.equal(got, want)


def test_local_topk_puts_nan_last():
    """The eager head's rule, as the kernel: NaN is never kept over a real score (torch.topk keeps
    NaN first)."""
    scores = torch.tensor([[0.5, float("nan"), -2.0, 1.0, float("nan"), 3.0, 0.0, -1.0]])
    kept = local_topk(scores, 4, 2)  # blocks: rows 0,2,4,6 and 1,3,5,7
    assert sorted(kept[0].tolist()) == [0, 3, 5, 6]
