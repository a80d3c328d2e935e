"""lmforge's Triton attention kernels against PyTorch SDPA on one GPU: prefill TFLOP/s, decode bandwidth.

Prefill (`kernels.prefill`, a prompt of S tokens into an empty cache, so L = S) against
`F.scaled_dot_product_attention` restricted to the flash backend, bf16, head dims 64 and 128, S from 512
to 16k, causal and not; batch x heads fill the GPU with 16k tokens x 2048 model width per call:

    FLOPs       = 4 * B * H * S * S * D          (QK^T and PV), halved when causal
    TFLOP/s     = FLOPs / time

Decode (`kernels.decode`, one new token per sequence over a cache of L slots) against SDPA over the same
cache (its best backend, GQA by `enable_gqa`), Llama-8B-shaped heads (32 query, 8 kv, D 128), bf16,
L from 1k to 32k, batch 1 to 64:

    bytes       = K + V cache read once: 2 * B * Hkv * L * D * 2   (+ q and out, negligible)
    GB/s        = bytes / time;   BW % = GB/s / measured device read bandwidth

Each row also checks the kernel's output against SDPA's (max abs error), so a fast wrong kernel shows.
Times are medians of `triton.testing.do_bench`. Needs a CUDA GPU.

Run (from the repository root):

    python bench/attention.py [--quick] [--json]
    TRITON_INTERPRET=1 python bench/attention.py --smoke      # on the CPU: checks the script runs
"""

from __future__ import annotations

import datetime
import json
import math

import torch
import torch.nn.functional as F
from _gpu import setup


def prefill_rows(quick: bool, smoke: bool):
    if smoke:
        yield from [(64, 40, True, 1, 2), (128, 33, False, 1, 1)]
        return
    for D in (64, 128):
        for S in ((512, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)):
            for causal in (True, False):
                B, H = max(1, 16384 // S), 2048 // D
                yield D, S, causal, B, H


def decode_rows(quick: bool, smoke: bool):
    if smoke:
        yield from [(70, 1), (50, 2)]
        return
    for L in ((1024, 8192) if quick else (1024, 4096, 8192, 16384, 32768)):
        for B in ((1, 16) if quick else (1, 4, 16, 64)):
            if B * L <= 64 * 32768 // 2 or B == 1:  # keep each cache under ~8 GiB
                yield L, B


def main() -> None:
    args, dev, do_bench, bandwidth = setup(__doc__, "bench/attention.py")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmforge.codegen.kernels import attention as kernels

    flash = [SDPBackend.FLASH_ATTENTION] if dev.type == "cuda" else [SDPBackend.MATH]
    dtype = torch.bfloat16
    rows = []

    for D, S, causal, B, H in prefill_rows(args.quick, args.smoke):
        q, k, v = (torch.randn(B, H, S, D, device=dev, dtype=dtype) for _ in range(3))
        mask = torch.ones(B, S, dtype=torch.long, device=dev)
        scale = 1 / math.sqrt(D)
        ours = lambda: kernels.prefill(q, k, v, mask, scale, causal)  # noqa: E731
        with sdpa_kernel(flash):
            theirs = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)  # noqa: E731
            want = theirs()
            t_theirs = do_bench(theirs)
        err = (ours().float() - want.float()).abs().max().item()
        t_ours = do_bench(ours)
        flops = 4 * B * H * S * S * D / (2 if causal else 1)
        rows.append(dict(kind="prefill", shape=f"D={D} S={S} B={B} H={H}{' causal' if causal else ''}",
                         lmforge_ms=t_ours, sdpa_ms=t_theirs, lmforge_rate=flops / t_ours / 1e9,
                         sdpa_rate=flops / t_theirs / 1e9, unit="TFLOP/s", share=None, max_err=err))

    Hq, Hkv, D = 32, 8, 128
    for L, B in decode_rows(args.quick, args.smoke):
        q = torch.randn(B, Hq, 1, D, device=dev, dtype=dtype)
        k, v = (torch.randn(B, Hkv, L, D, device=dev, dtype=dtype) for _ in range(2))
        mask = torch.ones(B, L, dtype=torch.long, device=dev)
        scale = 1 / math.sqrt(D)
        ours = lambda: kernels.decode(q, k, v, mask, scale)  # noqa: E731
        theirs = lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)  # noqa: E731
        err = (ours().float() - theirs().float()).abs().max().item()
        t_ours, t_theirs = do_bench(ours), do_bench(theirs)
        nbytes = 2 * B * Hkv * L * D * 2
        rows.append(dict(kind="decode", shape=f"L={L} B={B} Hq={Hq} Hkv={Hkv} D={D}", lmforge_ms=t_ours,
                         sdpa_ms=t_theirs, lmforge_rate=nbytes / t_ours / 1e6, sdpa_rate=nbytes / t_theirs / 1e6,
                         unit="GB/s", share=nbytes / (t_ours / 1e3) / bandwidth, max_err=err))

    if args.json:
        print(json.dumps({"date": datetime.date.today().isoformat(), "device": str(dev),
                          "bandwidth_gb_s": bandwidth / 1e9, "rows": rows}, indent=2))
        return
    device_name = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU (Triton interpreter, smoke run)"
    print(f"{datetime.date.today()}  {device_name}  torch {torch.__version__}  "
          f"read bandwidth {bandwidth / 1e9:.0f} GB/s  bf16")
    print("| kind | shape | lmforge ms | SDPA ms | lmforge | SDPA | unit | lmforge / SDPA | BW % | max err |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        share = f"{100 * r['share']:.0f} %" if r["share"] is not None else ""
        print(f"| {r['kind']} | {r['shape']} | {r['lmforge_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['lmforge_rate']:.1f} "
              f"| {r['sdpa_rate']:.1f} | {r['unit']} | {r['sdpa_ms'] / r['lmforge_ms']:.2f}x | {share} "
              f"| {r['max_err']:.1e} |")


if __name__ == "__main__":
    main()
