"""`--format onnx`: a directory onnxruntime-genai runs as it runs its own model builder's output.

    model.onnx, model.onnx.data    the graph (ONNX Runtime's fused LLM ops) and its weights as external data
    genai_config.json              the decoder's inputs/outputs, heads, context length, token ids, greedy search
    tokenizer.json, ...            the artifact's tokenizer files

The graph is lmforge's own, exported by `torch.onnx` (dynamo) after `onnx_graph.prepare` puts it in genai's
calling convention: inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value`
(B, kv heads, past, head dim), outputs `logits` (B, S, vocab) and `present.N.key/value`. lmforge's fused ops
map one to one (`onnx_ops.py`): attention to GroupQueryAttention, RMSNorm to SimplifiedLayerNormalization, the
residual add and norm to SkipSimplifiedLayerNormalization, int4/int8 linears to MatMulNBits. It computes in
float32, ONNX Runtime's CPU kernels' precision (a bfloat16 artifact's weights widen exactly; int4 and int8
weights stay as they are, scales in float32; MatMulNBits multiplies them by activations quantized to int8 per
block, its fast CPU path, unless `activations="float"` keeps lmforge's numbers exactly). GroupQueryAttention reads the mask as genai writes it: a
sequence's tokens first, padding after (right padding); `attention_mask`'s sum per row is its length.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import LmforgeError
from lmforge.export.formats import ExportSource, Format, register_format, require

MODEL = "model.onnx"
# onnxruntime-genai's model types (src/models/model_type.h) lmforge captures; others run as "decoder"
GENAI_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "granite",
               "olmo", "smollm3")


# --activations -> MatMulNBits' accuracy_level: 4 quantizes each block of A to int8 (ONNX Runtime's fast CPU
# kernels: 40x the float path's speed for 8-bit weights, 2x for 4-bit, measured on 576x1536), 0 keeps A float
ACCURACY_LEVELS = {"int8": 4, "float": 0}


def write(src: ExportSource, out: Path, step: Callable[[str], None], activations: str = "int8") -> dict[str, Any]:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise LmforgeError(f"--format onnx needs {e.name}: pip install 'lmforge[export]'") from None
    import torch

    from lmforge.export import onnx_graph, onnx_ops, onnx_schemas

    require(src.graph is not None, "--format onnx needs the artifact's graph")
    ir = src.graph
    step("rewriting the graph for ONNX Runtime")
    layers = onnx_graph.prepare(ir, ACCURACY_LEVELS[activations])
    step("exporting with torch.onnx")
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                ir.gm, tuple(onnx_graph.example_inputs(ir)), dynamo=True, optimize=True,
                input_names=onnx_graph.input_names(layers), output_names=onnx_graph.output_names(layers),
                dynamic_shapes=onnx_graph.dynamic_shapes(layers), custom_translation_table=onnx_ops.TRANSLATIONS)
    except Exception as e:
        raise LmforgeError(f"torch.onnx could not export the graph: {_cause(e)}") from e
    step("writing model.onnx")
    program.save(str(out / MODEL), external_data=True)
    onnx_schemas.check(str(out / MODEL))
    (out / "genai_config.json").write_text(json.dumps(genai_config(src, ir, layers), indent=2))
    for file in src.tokenizer_files():
        shutil.copyfile(file, out / file.name)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in program.model.graph)
    fused = {k: v for k, v in ops.items() if k.startswith("com.microsoft") or "Simplified" in k}
    return {"nodes": sum(ops.values()), "fused_ops": dict(sorted(fused.items()))}


@contextlib.contextmanager
def _quiet():
    """torch.onnx's progress prints, its registry's warnings (torchvision ops it skips) and its dim-renaming
    warnings are about its own machinery, not the user's model: keep them off the terminal."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _cause(e: Exception) -> str:
    """The root cause torch.onnx's report names first ("<class 'X'>: message"), else the error's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith("<class '")]
    return (causes or lines or [type(e).__name__])[0][:300]


def genai_config(src: ExportSource, ir, layers: int) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for the exported decoder (greedy search by default)."""
    cfg = src.config
    info = src.artifact.manifest.get("tokenizer") or {}
    first = ir.kv.layers[0]
    heads = int(cfg.get("num_attention_heads", 0))
    context = int(src.artifact.max_seq_len)

    def token(key: str):
        value = info.get(key, cfg.get(key))
        return value if isinstance(value, (int, list)) else None

    model_type = src.model_type if src.model_type in GENAI_TYPES else "decoder"
    model: dict[str, Any] = {
        "bos_token_id": token("bos_token_id"),
        "context_length": context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL,
            "head_size": first.k_head_dim,
            "hidden_size": int(cfg.get("hidden_size", heads * first.k_head_dim)),
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": first.n_kv_heads,
        },
        "eos_token_id": token("eos_token_id"),
        "pad_token_id": token("pad_token_id"),
        "type": model_type,
        "vocab_size": int(cfg.get("vocab_size", 0)),
    }
    return {
        "model": {key: value for key, value in model.items() if value is not None},  # genai: absent, not null
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


register_format(Format(
    name="onnx",
    summary="an ONNX model with ONNX Runtime's fused LLM ops (GroupQueryAttention, RotaryEmbedding, MatMulNBits, "
            "SimplifiedLayerNormalization), its weights as external data, and genai_config.json",
    consumer="ONNX Runtime and onnxruntime-genai (CPU)",
    architectures=(),  # lmforge's graph as it is: whatever lmforge captures and fuses
    schemes=("none (computed in float32)", "int4 (MatMulNBits, block = group, zero points as held)",
             "int8 (MatMulNBits 8-bit)"),
    write=write,
    options={"activations": tuple(ACCURACY_LEVELS)},
    notes="Refuses fp8 (optimize with --quant int4 or int8, or export fp8 with --format hf) and int4 groups "
          "that are not a power of two >= 16.",
))
