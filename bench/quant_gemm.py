"""lmforge's quantized matmul kernels (`codegen/kernels/int4.py`, `fp8.py`, `int8.py`) against bf16 cuBLAS and PyTorch's own
quantized GEMMs on one GPU, on Llama-3-8B's linear layers, bf16 activations.

Shapes (N, K): q/o (4096, 4096), k/v (1024, 4096), gate/up (14336, 4096), down (4096, 14336).

int4 (group size 128, float zero points), M = 1, 4, 16, 64, 256, 1024, against
- bf16: `F.linear` on the dequantized weight (cuBLAS);
- tinygemm: `torch.ops.aten._weight_int4pack_mm` on the same weight converted by
  `aten._convert_weight_to_int4pack` (what torchao's int4 weight-only layout runs on CUDA; torchao itself is
  not needed). tinygemm's zero point lives in the float domain: W = (q - 8) * scale + zero', so
  zero' = (8 - zero) * scale, rounded to bf16.

fp8 (e4m3 weight, per-channel scale, x quantized per token inside the kernel), M = 1, 16, 256, 512, 1024,
4096, against bf16 and `torch._scaled_mm` with row-wise scales, timed with the torch quantization of x it
needs (as `lmforge::fp8_linear` runs it), where the GPU has it (compute capability 8.9+).

int8 weight-only (per-channel float32 scale, bf16 x), M = 1, 16, 256, 1024, against bf16 and PyTorch's
`aten._weight_int8pack_mm` (torchao's int8 weight-only kernel, scales in x's dtype) where the build has it.

    FLOPs       = 2 * M * N * K;   TFLOP/s = FLOPs / time
    weight B    = int4: N * K / 2 + 2 * (N * K / 128) * 2  (packed nibbles, bf16 scales and zeros)
                  fp8 and int8:  N * K + 4 * N;   bf16: 2 * N * K
    GB/s        = weight bytes / time (activations and outputs not counted: they matter only at large M)
    BW %        = GB/s / measured read bandwidth (a 2 GiB reduction, as bench/attention.py measures it)
    vs bf16     = bf16 time / lmforge time (> 1: lmforge faster);  vs base = tinygemm, _scaled_mm or
                  _weight_int8pack_mm likewise
    max err     = max |lmforge - reference| (`int4_reference` / `fp8_reference` / `int8_reference`: float32
                  math, bf16 output)

Times are medians of `triton.testing.do_bench`; the first call of each shape autotunes (cached on disk).
Needs a CUDA GPU.

Run (from the repository root):

    python bench/quant_gemm.py [--quick] [--json]
    TRITON_INTERPRET=1 python bench/quant_gemm.py --smoke      # on the CPU: checks the script runs
"""

from __future__ import annotations

import datetime
import json

import torch
import torch.nn.functional as F
from _gpu import setup

from lmforge.quant import fp8, int4, int8

LLAMA_8B = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)]
GROUP = 128
INT4_M = ((1, 4, 16, 64, 256, 1024), (1, 16, 1024))  # all, --quick
FP8_M = ((1, 16, 256, 512, 1024, 4096), (1, 256, 4096))
INT8_M = ((1, 16, 256, 1024), (1, 256))


def shape_rows(ms: tuple[tuple[int, ...], tuple[int, ...]], smoke_k: int, quick: bool, smoke: bool):
    """(layer, N, K, M) for every M in `ms` (its second entry with --quick) and Llama-8B shape."""
    if smoke:
        yield from [("tiny", 48, smoke_k, 1), ("tiny", 48, smoke_k, 20)]
        return
    shapes = LLAMA_8B[::2] if quick else LLAMA_8B
    for M in ms[1] if quick else ms[0]:
        for name, N, K in shapes:
            yield name, N, K, M


def make_int4(N: int, K: int, dev: torch.device, gen: torch.Generator):
    """Random packed int4 weight: qweight (N, K // 2) uint8, scales and float zeros (N, K // 128) bf16."""
    qweight = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen).to(dev)
    scales = (torch.rand(N, K // GROUP, generator=gen) * 0.01 + 0.005).to(dev, torch.bfloat16)
    zeros = (torch.rand(N, K // GROUP, generator=gen) * 15).to(dev, torch.bfloat16)
    return qweight, scales, zeros


def tinygemm(x, qweight, scales, zeros):
    """A function running torch's tinygemm int4 kernel on the same weight, or None where this torch lacks it."""
    q = int4.unpack(qweight)  # (N, K) values 0..15, columns in order
    scale_zero = torch.stack([scales.float(), (8 - zeros.float()) * scales.float()], dim=-1)  # (N, K / G, 2)
    scale_zero = scale_zero.transpose(0, 1).contiguous().to(torch.bfloat16)  # (K / G, N, 2)
    try:
        if x.device.type == "cuda":
            packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).contiguous(), 8)
            mm = torch.ops.aten._weight_int4pack_mm
        else:  # the CPU flavour, for the smoke run
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        mm(x, packed, GROUP, scale_zero)
    except (RuntimeError, AttributeError, NotImplementedError) as e:  # an op missing or not built for this GPU
        print(f"# tinygemm unavailable: {str(e).splitlines()[0][:120]}")
        return None
    return lambda: mm(x, packed, GROUP, scale_zero)


def make_fp8(N: int, K: int, dev: torch.device, gen: torch.Generator):
    """A random weight quantized per output channel as `quant/fp8.py` does (its row quantizer, which needs no
    torchao): (N, K) e4m3 and (N,) float32 scales."""
    qdata, scale = fp8.quantize_rows(torch.randn(N, K, generator=gen) * 0.02)
    return qdata.to(dev), scale[:, 0].to(dev)


def scaled_mm(x, weight, weight_scale):
    """`lmforge::fp8_linear`'s GPU path: torch._scaled_mm with row-wise scales, x quantized by torch ops first;
    None where unsupported."""
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) < (8, 9):
        return None
    from lmforge.codegen.quant_linear import _fp8_scaled_mm

    def run():
        return _fp8_scaled_mm(x, weight, weight_scale, None)

    try:
        run()
    except (RuntimeError, NotImplementedError) as e:
        print(f"# _scaled_mm unavailable: {str(e).splitlines()[0][:120]}")
        return None
    return run


def int8pack_mm(x, qweight, scales):
    """PyTorch's int8 weight-only kernel on the same codes, its scales in x's dtype; None where unsupported."""
    scales_x = scales.to(x.dtype)

    def run():
        return torch.ops.aten._weight_int8pack_mm(x, qweight, scales_x)

    try:
        run()
    except (RuntimeError, NotImplementedError) as e:
        print(f"# _weight_int8pack_mm unavailable: {str(e).splitlines()[0][:120]}")
        return None
    return run


def main() -> None:
    args, dev, do_bench, bandwidth = setup(__doc__, "bench/quant_gemm.py")
    from lmforge.codegen.kernels import fp8 as fp8_kernels
    from lmforge.codegen.kernels import int4 as int4_kernels
    from lmforge.codegen.kernels import int8 as int8_kernels
    from lmforge.codegen.quant_linear import fp8_reference, int4_reference, int8_reference

    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    rows = []

    def row(kind, name, M, N, K, t_ours, t_bf16, base, t_base, nbytes, err):
        rows.append(dict(kind=kind, layer=name, M=M, N=N, K=K, lmforge_ms=t_ours, bf16_ms=t_bf16, base=base,
                         base_ms=t_base, tflops=2 * M * N * K / t_ours / 1e9, weight_gb_s=nbytes / t_ours / 1e6,
                         bw_share=nbytes / (t_ours / 1e3) / bandwidth, max_err=err))

    for name, N, K, M in shape_rows(INT4_M, 256, args.quick, args.smoke):
        qweight, scales, zeros = make_int4(N, K, dev, gen)
        x = torch.randn(M, K, generator=gen).to(dev, dtype)
        w_bf16 = int4.dequantize(int4.Int4Weight(qweight, scales, zeros, GROUP), dtype)
        ours = lambda: int4_kernels.int4_matmul(x, qweight, scales, zeros, GROUP)  # noqa: E731
        err = (ours().float() - int4_reference(x, qweight, scales, zeros, GROUP).float()).abs().max().item()
        theirs = tinygemm(x, qweight, scales, zeros)
        t_ours, t_bf16 = do_bench(ours), do_bench(lambda: F.linear(x, w_bf16))
        nbytes = N * K // 2 + 2 * (N * K // GROUP) * 2
        row("int4", name, M, N, K, t_ours, t_bf16, "tinygemm", do_bench(theirs) if theirs else None, nbytes, err)

    for name, N, K, M in shape_rows(FP8_M, 96, args.quick, args.smoke):
        weight, weight_scale = make_fp8(N, K, dev, gen)
        x = torch.randn(M, K, generator=gen).to(dev, dtype)
        w_bf16 = fp8.dequantize(fp8.Fp8Weight(weight, weight_scale), dtype)
        ours = lambda: fp8_kernels.fp8_matmul(x, weight, weight_scale)  # noqa: E731
        err = (ours().float() - fp8_reference(x, weight, weight_scale).float()).abs().max().item()
        theirs = scaled_mm(x, weight, weight_scale)
        t_ours, t_bf16 = do_bench(ours), do_bench(lambda: F.linear(x, w_bf16))
        row("fp8", name, M, N, K, t_ours, t_bf16, "_scaled_mm", do_bench(theirs) if theirs else None,
            N * K + 4 * N, err)

    for name, N, K, M in shape_rows(INT8_M, 96, args.quick, args.smoke):
        p = int8.quantize(torch.randn(N, K, generator=gen) * 0.02)
        qweight, scales = p.qdata.to(dev), p.scale.to(dev)
        x = torch.randn(M, K, generator=gen).to(dev, dtype)
        w_bf16 = int8.dequantize(int8.Int8Weight(qweight, scales), dtype)
        ours = lambda: int8_kernels.int8_matmul(x, qweight, scales)  # noqa: E731
        err = (ours().float() - int8_reference(x, qweight, scales).float()).abs().max().item()
        theirs = int8pack_mm(x, qweight, scales)
        t_ours, t_bf16 = do_bench(ours), do_bench(lambda: F.linear(x, w_bf16))
        row("int8", name, M, N, K, t_ours, t_bf16, "int8pack_mm", do_bench(theirs) if theirs else None,
            N * K + 4 * N, err)

    if args.json:
        print(json.dumps({"date": datetime.date.today().isoformat(), "device": str(dev),
                          "bandwidth_gb_s": bandwidth / 1e9, "rows": rows}, indent=2))
        return
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter, smoke run)"
    print(f"{datetime.date.today()}  {device_name}  torch {torch.__version__}  "
          f"read bandwidth {bandwidth / 1e9:.0f} GB/s  bf16 activations")
    print("| kind | layer | M | N | K | lmforge ms | bf16 ms | base | base ms | TFLOP/s | weight GB/s | BW % "
          "| vs bf16 | vs base | max err |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        base_ms, vs_base = ("", "") if r["base_ms"] is None else (f"{r['base_ms']:.4f}",
                                                                    f"{r['base_ms'] / r['lmforge_ms']:.2f}x")
        print(f"| {r['kind']} | {r['layer']} | {r['M']} | {r['N']} | {r['K']} | {r['lmforge_ms']:.4f} "
              f"| {r['bf16_ms']:.4f} | {r['base']} | {base_ms} | {r['tflops']:.1f} | {r['weight_gb_s']:.0f} "
              f"| {100 * r['bw_share']:.0f} % | {r['bf16_ms'] / r['lmforge_ms']:.2f}x | {vs_base} "
              f"| {r['max_err']:.1e} |")


if __name__ == "__main__":
    main()
