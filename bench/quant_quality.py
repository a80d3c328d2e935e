"""Quality of lmforge's quantization schemes on the demo model: held-out perplexity, one table.

Each row optimizes the embedded demo model (`lmforge/demo`, a 3.7M-parameter Llama) with one setting and
runs `lmforge eval`'s perplexity on its held-out text (9,644 predicted tokens, windows of 256):

    perplexity = exp(mean over predicted tokens of -log p(token))
    (+x%)      = perplexity / perplexity(unquantized, same compute dtype) - 1
    weight err = ||W_dequantized - W|| / ||W||  over all quantized layers (Frobenius), W the checkpoint's

On a model this small the perplexity moves by a few tenths of a percent between settings of equal merit
(int4 g32 symmetric scores below bfloat16), so the weight error is the steadier comparison between two
round-to-nearest schemes.

Rows: unquantized; int4 round-to-nearest at group sizes 32/64/128, asymmetric and symmetric; int4 with
HQQ's zero-point search; fp8 dynamic; int8 weight-only per channel; and, for comparison on the same weights, torchao's own int4
weight-only numerics (its tinygemm scheme: float zero points, scale = (max - min) / 15, bf16 scales and
zeros), applied as fake quantization to the Hugging Face weights before an unquantized optimize. Each row
runs with bfloat16 and with float32 compute (int4 scales and zero points in that dtype); all keep lm_head
(tied to the embeddings) in float. The weight error and size columns are the bfloat16 artifact's.

Run (from the repository root; about 8 minutes on a 2-core CPU):

    python bench/quant_quality.py [--json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch

import lmforge
from lmforge.runtime.evaluate import default_text, perplexity


def torchao_int4_fake_quant(model: torch.nn.Module, group_size: int) -> torch.nn.Module:
    """Replace every decoder linear weight by torchao's tinygemm int4 round trip (what its int4 weight-only
    config computes), leaving embeddings and lm_head alone."""
    from lmforge.quant import torchao_primitives

    ao = torchao_primitives()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                w = module.weight.float()
                block = (1, group_size)
                scale, zero = ao._choose_qparams_affine_tinygemm(
                    w, ao.MappingType.ASYMMETRIC, block, torch.int32, 0, 15, 1e-6, torch.bfloat16, torch.bfloat16)
                q = ao._quantize_affine_tinygemm(w, block, scale, zero, torch.int32, 0, 15)
                deq = ao._dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15,
                                                     output_dtype=torch.float32)
                module.weight.copy_(deq.to(module.weight.dtype))
    return model


def weight_error(weights: dict[str, torch.Tensor], original: dict[str, torch.Tensor], layers) -> float:
    """Relative Frobenius error of `layers`' weights in `weights` (float, or packed as lmforge stores them)."""
    from lmforge.quant import handler

    err = total = 0.0
    for layer, cfg in layers.items():
        w = original[f"{layer}.weight"].double()
        if cfg is None:
            got = weights[f"{layer}.weight"].double()
        else:  # the scheme's own dequantize, on the layer's packed tensors by suffix
            scheme = handler(cfg["scheme"])
            packed = {k.removeprefix(f"{layer}."): t for k, t in weights.items() if k.startswith(f"{layer}.")}
            got = scheme.dequantize(packed, scheme.config(**{k: v for k, v in cfg.items() if k != "scheme"})).double()
        err += float(((got - w) ** 2).sum())
        total += float((w ** 2).sum())
    return (err / total) ** 0.5


def rows(quick: bool):
    """(label, optimize kwargs, torchao fake-quant group size or None); each runs in both compute dtypes."""
    yield "unquantized", {}, None
    groups = (128,) if quick else (32, 64, 128)
    for g in groups:
        yield f"int4 g{g} asym rtn", dict(quant="int4", group_size=g), None
        yield f"int4 g{g} sym rtn", dict(quant="int4", group_size=g, symmetric=True), None
    yield "int4 g128 asym hqq", dict(quant="int4", group_size=128, quant_method="hqq"), None
    yield "fp8 dynamic", dict(quant="fp8"), None
    yield "int8 per channel", dict(quant="int8"), None
    for g in groups:
        yield f"torchao int4 g{g} (fake quant)", {}, g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of the table.")
    parser.add_argument("--quick", action="store_true", help="Group size 128 only.")
    args = parser.parse_args()
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from lmforge.demo import model_dir
    from lmforge.ir.capture import load_hf_model

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    original = {k: v.float() for k, v in load_file(str(model_dir() / "model.safetensors")).items()}
    decoder = None  # the quantizable layers' names, from the first quantized artifact
    ids = tokenizer.encode(default_text().read_text(), add_special_tokens=False).ids
    results = []
    with tempfile.TemporaryDirectory() as work:
        for label, kwargs, torchao_group in rows(args.quick):
            row = {"setting": label}
            for dtype in ("bfloat16", "float32"):
                source = None
                if torchao_group is not None:
                    model, _ = load_hf_model(str(model_dir()), dtype=torch.float32)
                    source = torchao_int4_fake_quant(model, torchao_group)
                out = Path(work) / f"{label.replace(' ', '_')}-{dtype}"
                art = lmforge.optimize(source, out, dtype=dtype, max_seq_len=256, **kwargs)
                r = perplexity(lmforge.load(art.path), ids=ids)
                row[f"perplexity_{dtype}"], row["tokens"] = r.perplexity, r.tokens
                if dtype == "float32":
                    continue
                row["weights_bytes"] = art.manifest["files"]["model.safetensors"]["bytes"]
                quantized = (art.manifest.get("quantization") or {}).get("layers")
                decoder = decoder or quantized
                if quantized:
                    row["weight_error"] = weight_error(load_file(str(art.path / "model.safetensors")), original,
                                                       quantized)
                elif torchao_group is not None:
                    row["weight_error"] = weight_error(
                        {f"{n}.weight": m.weight.detach() for n, m in source.named_modules()
                         if isinstance(m, torch.nn.Linear)}, original, dict.fromkeys(decoder))
                else:
                    row["weight_error"] = None
            results.append(row)
            print(f"  {label}: {row['perplexity_bfloat16']:.3f} (bf16), {row['perplexity_float32']:.3f} (fp32)",
                  flush=True)
    base = results[0]
    for r in results:
        for dtype in ("bfloat16", "float32"):
            r[f"vs_unquantized_{dtype}"] = r[f"perplexity_{dtype}"] / base[f"perplexity_{dtype}"] - 1
    if args.json:
        print(json.dumps({"date": datetime.date.today().isoformat(), "torch": torch.__version__,
                          "rows": results}, indent=2))
        return
    print(f"\nDemo model held-out perplexity ({results[0]['tokens']} tokens), {datetime.date.today()}, "
          f"torch {torch.__version__}")
    print(f"| {'setting':<30} | ppl, bf16 compute | ppl, fp32 compute | weight err | weights MB |")
    print(f"| {'-' * 30} | ----------------: | ----------------: | ---------: | ---------: |")
    for r in results:
        err = "-" if r["weight_error"] is None else f"{r['weight_error']:.5f}"
        size = "-" if "fake quant" in r["setting"] else f"{r['weights_bytes'] / 1e6:.2f}"
        cells = [f"{r[f'perplexity_{d}']:.3f} ({r[f'vs_unquantized_{d}'] * 100:+.2f}%)" for d in ("bfloat16", "float32")]
        print(f"| {r['setting']:<30} | {cells[0]:>17} | {cells[1]:>17} | {err:>10} | {size:>10} |")


if __name__ == "__main__":
    main()
