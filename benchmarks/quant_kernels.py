"""The quantized products on the packaged models' real tensors: HiRE's native qgemv (int8 and
int16 activations) and qaxpy against what torch ships for the same shapes (the float16 GEMV the
16-bit engine runs, and torch's int8 weight-only GEMM ``_weight_int8pack_mm``, per-row scales: the
closest fused kernel torch has to Q8_0, which has one scale per 32 columns).

Each is timed warm on one matrix at a time (best of 30 calls), so small matrices sit in cache:
compare the kernels with each other, not with the machine's DRAM bandwidth.

    .venv/bin/python benchmarks/quant_kernels.py            # ~1 min, writes benchmarks/quant_kernels.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from hire import native
from hire.models.builtin import BUILTIN_MODELS
from hire.quant import QTensor

TENSORS = ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
           "blk.0.ffn_down.weight")


def best(fn, n: int = 30) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.unavailable_reason()}")
    torch.set_num_threads(2)
    rows = []
    for name, entry in BUILTIN_MODELS.items():
        reader = GGUFReader(str(entry.locate()))
        for t in reader.tensors:
            if t.name not in TENSORS:
                continue
            shape = (int(t.shape[1]), int(t.shape[0]))
            q = QTensor.from_blocks(t.tensor_type.name, np.asarray(t.data), shape)
            x = torch.randn(shape[1])
            row = {"model": name, "tensor": t.name, "format": t.tensor_type.name, "shape": shape,
                   "mb": q.nbytes / 1e6}
            for bits in (8, 16):
                q.act_bits = bits
                s = best(lambda: native.qgemv(x, q))
                row[f"qgemv_int{bits}_ms"], row[f"qgemv_int{bits}_gb_s"] = 1e3 * s, q.nbytes / s / 1e9
            w = q.dequantize()
            w16 = w.half()
            s = best(lambda: native.gemv(x.view(1, -1), w16))
            row["fp16_gemv_ms"], row["fp16_gemv_gb_s"] = 1e3 * s, w16.numel() * 2 / s / 1e9
            scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127
            w8 = torch.round(w / scales[:, None]).to(torch.int8)
            xb = x.view(1, -1).bfloat16()
            s = best(lambda: torch._weight_int8pack_mm(xb, w8, scales.bfloat16()))
            row["torch_int8pack_ms"], row["torch_int8pack_gb_s"] = 1e3 * s, w8.numel() / s / 1e9
            if shape[0] <= 8192:
                qc = q.to_layout("columns")
                a = torch.randn(shape[1])
                s = best(lambda: native.qaxpy(qc, None, a))
                row["qaxpy_all_ms"] = 1e3 * s
                idx = torch.randperm(shape[1])[: int(0.6 * shape[1])]
                s = best(lambda: native.qaxpy(qc, idx, a[: idx.numel()]))
                row["qaxpy_60pct_ms"] = 1e3 * s
            rows.append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del reader
    out = Path(__file__).with_suffix(".json")
    out.write_text(json.dumps({"simd": native.simd_path(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
