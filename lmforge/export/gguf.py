"""`--format gguf`: one GGUF file for llama.cpp (and what embeds it: llama-cpp-python, Ollama, LM Studio).

The file holds llama.cpp's tensor names (`blk.N.attn_q.weight`, ...), the metadata its loader requires
(`general.architecture`, `<arch>.block_count`, `.context_length`, `.embedding_length`, `.feed_forward_length`,
`.attention.head_count[_kv]`, `.rope.freq_base`, `.rope.dimension_count`, `.attention.layer_norm_rms_epsilon`),
and the artifact's tokenizer (`tokenizer.ggml.*`: a byte-level BPE as model `gpt2`, with the pre-tokenizer of
GPT-2, Llama 3 or Qwen2 as its splitting regex says, or `none` when the
artifact has no tokenizer, so llama.cpp runs on token ids).

Architectures and how they map (`ARCHITECTURES`): Llama and Mistral become llama.cpp's `llama`, whose rotary
embedding rotates adjacent pairs where Hugging Face's rotates halves, so the rows of q_proj and k_proj are
permuted per head (`_pair_rows`); Qwen2, Qwen3, Phi-3 and Gemma keep their rows (llama.cpp rotates halves
there). Phi-3's fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they are. Gemma's norm
weights, which lmforge folds into 1 + w, are what llama.cpp's gemma reads (its converter adds the 1), written
under the norms' names (`_norm_names`: each folded weight named by the layer that reads its norm), and its
embedding scale is llama.cpp's own sqrt(hidden). llama.cpp's `llama` and `phi3` have no sliding window: an
artifact whose window is shorter than its cache is refused, naming `--max-seq-len`.

Weights (`--outtype`): norms and biases F32; the rest as the artifact holds them (F32, BF16 or F16) or as asked.
An int4 artifact quantized symmetrically in groups of 32 becomes Q4_0 exactly: Q4_0 is a float16 scale d and
32 codes q with W = (q - 8) * d, which is lmforge's symmetric int4 at group size 32 with the 16 bytes ordered
q[j] | q[j + 16] << 4 (the scales' float16 rounding is measured and reported, 0 for bfloat16 scales). Other
int4 settings are refused, naming the options that map exactly. int8 and fp8 layers, and float ones asked
for as Q8_0 or Q4_0, are quantized by gguf-py's reference of llama.cpp's own rounding from their dequantized
values, and the summary reports the largest relative error that cost per layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.export.formats import ExportSource, Format, register_format, require

# model_type -> (llama.cpp architecture, whether q/k rows need the half-to-pair permutation)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "phi3": ("phi3", False), "gemma": ("gemma", False)}
_NO_WINDOW = ("llama", "phi3")  # llama.cpp architectures that attend without a sliding window
OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0")
_FLOAT_OUTTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# Hugging Face name -> GGUF name, {i} the layer
_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{}.attn_q.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{}.attn_k.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{}.attn_v.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", "blk.{}.attn_output.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{}.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.(weight|bias)", "blk.{}.attn_qkv.{}"),  # Phi-3: q, k, v rows
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blk.{}.ffn_up.weight"),  # Phi-3: gate then up rows
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
]


def gguf_name(name: str) -> str | None:
    for pattern, target in _NAMES:
        m = re.fullmatch(pattern, name)
        if m:
            return target.format(*m.groups())
    return None


def _norm_names(src: ExportSource) -> dict[str, str]:
    """Norm weights constant-folded into new tensors (Gemma's 1 + w, which llama.cpp's gemma reads as its norm
    weight) -> the source name of the norm they stand for, told by the first linear layer reading the norm's
    output: attention's projections follow input_layernorm, the MLP's post_attention_layernorm, the lm_head
    the final norm."""
    from lmforge.ir.linear import as_linear

    ir = src.graph
    if ir is None:
        return {}
    lm = torch.ops.lmforge
    names: dict[str, str] = {}
    for node in ir.graph.nodes:
        if node.target not in (lm.rms_norm.default, lm.add_rms_norm.default):
            continue
        weight = node.args[1] if node.target is lm.rms_norm.default else node.args[2]
        source = ir.weight_names.get(getattr(weight, "target", None), "")
        if not source.startswith("lmforge.folded."):
            continue
        frontier, layer = list(node.users), None
        while frontier and layer is None:
            user = frontier.pop(0)
            linear = as_linear(user)
            if linear is not None:
                layer = ir.weight_names.get(linear.weight.target, "").rsplit(".", 1)[0]
            else:
                frontier.extend(user.users)
        m = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.\w+", layer or "")
        if m:
            norm = "input_layernorm" if m.group(2) == "self_attn" else "post_attention_layernorm"
            names[source] = f"model.layers.{m.group(1)}.{norm}.weight"
        elif layer == "lm_head":
            names[source] = "model.norm.weight"
    return names


def _pair_rows(n_rows: int, n_heads: int) -> torch.Tensor:
    """The row order that turns Hugging Face's rotate-half q/k projection (each head's first half of rows
    rotating with its second half) into llama.cpp's adjacent-pair one: row (h, j, i) takes row (h, i, j)."""
    head_dim = n_rows // n_heads
    return torch.arange(n_rows).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def _q4_0(q: torch.Tensor, scales: torch.Tensor) -> tuple[np.ndarray, float]:
    """Symmetric group-32 int4 (codes 0..15, (N, K); scales (N, K/32)) as Q4_0 blocks (N, K/32 * 18) bytes,
    and the largest relative change float16 made to a scale."""
    n, k = q.shape
    d = scales.float().to(torch.float16)
    change = ((d.float() - scales.float()).abs() / scales.float().abs().clamp(min=1e-30)).max().item()
    blocks = q.to(torch.uint8).reshape(n, k // 32, 32)
    packed = blocks[..., :16] | (blocks[..., 16:] << 4)  # byte j: q[j] low, q[j + 16] high
    out = torch.cat([d.reshape(n, k // 32, 1).view(torch.uint8).reshape(n, k // 32, 2), packed], dim=-1)
    return out.reshape(n, -1).numpy(), change


def _quantize(w: torch.Tensor, qtype) -> np.ndarray:
    from gguf import quants

    return quants.quantize(w.float().numpy(), qtype)


def _float(w: torch.Tensor, outtype: str):
    from gguf import GGMLQuantizationType as T

    if outtype == "f32":
        return w.float().numpy(), None
    if outtype == "f16":
        return w.to(torch.float16).numpy(), None
    return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), T.BF16


def write(src: ExportSource, out: Path, step: Callable[[str], None], outtype: str = "auto") -> dict[str, Any]:
    try:
        from gguf import GGMLQuantizationType as T
        from gguf import GGUFWriter, LlamaFileType
    except ImportError:
        raise LmforgeError("--format gguf needs the gguf package: pip install 'lmforge[export]'") from None

    from lmforge.quant import handler

    cfg = src.config
    arch, pair_rows = ARCHITECTURES[src.model_type]
    max_seq_len = src.artifact.max_seq_len
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    require(arch not in _NO_WINDOW or not window or window >= max_seq_len,
            f"llama.cpp's {arch} architecture has no sliding window, and this {src.model_type} artifact's window of "
            f"{window} tokens is shorter than its cache ({max_seq_len}); re-run `lmforge optimize` with "
            f"--max-seq-len {window}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    require(rope.get("rope_type", rope.get("type", "default")) in ("default", None),
            f"--format gguf does not carry rope scaling {rope.get('rope_type', rope.get('type'))!r} yet")
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    require(float(cfg.get("partial_rotary_factor", 1.0)) == 1.0,
            f"--format gguf does not carry a partial rotary embedding ({src.model_type}) yet")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    require(arch != "gemma" or act in ("gelu_pytorch_tanh", None),
            f"llama.cpp's gemma computes GELU's tanh form, not this artifact's {act}")
    n_heads, n_kv = int(cfg["num_attention_heads"]), int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    if outtype not in OUTTYPES:
        raise LmforgeError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    float_type = _FLOAT_OUTTYPE[src.dtype] if outtype in ("auto", "q4_0", "q8_0") else outtype
    layers = src.quantization.get("layers", {})

    step("converting the weights")
    tensors: dict[str, tuple[np.ndarray, Any, tuple[int, ...]]] = {}  # gguf name -> (data, raw type, shape)
    requantized: dict[str, float] = {}  # layer -> largest relative change to a weight
    claimed: set[str] = set()
    counts: dict[str, int] = {}

    def put(hf_name: str, data: np.ndarray, qtype, shape: tuple[int, ...]) -> None:
        name = gguf_name(hf_name)
        require(name is not None, f"--format gguf has no llama.cpp name for {hf_name} ({src.model_type})")
        tensors[name] = (data, qtype, shape)
        label = "F32" if qtype is None and data.dtype == np.float32 else (
            "F16" if qtype is None else qtype.name)
        counts[label] = counts.get(label, 0) + 1

    def rows_for(hf_name: str, n_rows: int) -> torch.Tensor | None:
        if not pair_rows:
            return None
        if ".self_attn.q_proj." in hf_name:
            return _pair_rows(n_rows, n_heads)
        if ".self_attn.k_proj." in hf_name:
            return _pair_rows(n_rows, n_kv)
        return None

    def matrix(hf_name: str, w: torch.Tensor, kind: str) -> None:
        """A float 2-D weight in the outtype asked (kind: the layer's quantized origin, or "float")."""
        perm = rows_for(hf_name, w.shape[0])
        if perm is not None:
            w = w[perm]
        target = outtype if outtype != "auto" else ("q8_0" if kind in ("int8", "fp8") else float_type)
        if target in ("q8_0", "q4_0") and w.shape[1] % 32 == 0 and not hf_name.endswith("embed_tokens.weight"):
            qtype = T.Q8_0 if target == "q8_0" else T.Q4_0
            data = _quantize(w, qtype)
            if kind != "float":
                from gguf import quants

                back = torch.from_numpy(quants.dequantize(data, qtype)).reshape(w.shape)
                requantized[hf_name] = ((back - w.float()).abs().max() / w.float().abs().max().clamp(min=1e-30)).item()
            put(hf_name, data, qtype, tuple(w.shape))
        else:
            data, qtype = _float(w, target if target in ("f32", "f16", "bf16") else float_type)
            put(hf_name, data, qtype, tuple(w.shape))

    for layer, described in layers.items():
        parts = src.packed(layer)
        claimed.update(f"{layer}.{s}" for s in parts)
        scheme = handler(described["scheme"])
        config = scheme.make_config(**{k: v for k, v in described.items() if k != "scheme"})
        hf_name = f"{layer}.weight"
        if described["scheme"] == "int4":
            exact = described.get("symmetric") and int(described["group_size"]) == 32
            if outtype in ("auto", "q4_0"):
                require(exact, f"{layer} is {scheme.label(described)}; Q4_0 holds symmetric groups of 32 exactly: "
                               f"re-run `lmforge optimize` with --group-size 32 --symmetric, or export with "
                               f"--outtype f32/f16/bf16/q8_0")
                from lmforge.quant.int4 import unpack

                q, scales = unpack(parts["qweight"]), parts["scales"]
                perm = rows_for(hf_name, q.shape[0])
                if perm is not None:  # a row permutation commutes with row-wise blocks
                    q, scales = q[perm], scales[perm]
                data, change = _q4_0(q, scales)
                if change:
                    requantized[hf_name] = change
                put(hf_name, data, T.Q4_0, tuple(q.shape))
                continue
        matrix(hf_name, scheme.dequantize(parts, config), described["scheme"])

    tied_only = False
    folded = _norm_names(src)
    for name, t in src.weights.items():
        if name.endswith("embed_tokens.embed_scale") and arch == "gemma":
            require(abs(float(t) - hidden ** 0.5) <= 1e-2 * hidden ** 0.5,
                    f"llama.cpp's gemma scales embeddings by sqrt({hidden}), not this artifact's {float(t)}")
            continue  # llama.cpp's gemma applies it itself
        if name in folded:
            name = folded[name]  # written under the norm's own name
        if name in claimed or name.startswith("lmforge.") or src.kinds.get(name) == "buffer":
            continue
        target = src.checkpoint_name(name)  # a tied weight: the checkpoint's name for it (the embedding)
        if target != name and name.removesuffix(".weight") not in layers:
            tied_only = True  # lm_head is the embedding: llama.cpp falls back to token_embd
        if t.dim() == 1:
            perm = rows_for(target, t.shape[0])
            put(target, (t[perm] if perm is not None else t).float().numpy(), None, tuple(t.shape))
        else:
            matrix(target, t, "float")
    require("token_embd.weight" in tensors, "the artifact has no input embedding (model.embed_tokens.weight)")
    if "output.weight" not in tensors and not tied_only and not cfg.get("tie_word_embeddings", False):
        require(False, "the artifact has no lm_head weight")

    step("writing gguf")
    writer = GGUFWriter(str(out), arch)
    writer.add_name(str(src.artifact.manifest.get("source", {}).get("model") or src.model_type))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_context_length(int(cfg.get("max_position_embeddings") or max_seq_len))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    vocab = tensors["token_embd.weight"][2][0]
    writer.add_vocab_size(vocab)
    q4 = counts.get("Q4_0", 0) >= max(counts.get("Q8_0", 0), 1)
    file_type = (LlamaFileType.MOSTLY_Q4_0 if q4 else LlamaFileType.MOSTLY_Q8_0 if counts.get("Q8_0")
                 else {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
                       "bf16": LlamaFileType.MOSTLY_BF16}[float_type])
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(2)
    _tokenizer(writer, src, vocab)
    for name, (data, qtype, shape) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)  # quantized: bytes (rows, bytes a row)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    summary: dict[str, Any] = {"architecture": arch, "tensors": " ".join(f"{n} {k}" for k, n in sorted(counts.items()))}
    if requantized:
        worst = max(requantized, key=requantized.get)
        summary["requantized"] = f"{len(requantized)} layers, largest relative change {requantized[worst]:.2e} ({worst})"
    return summary


# the splitting regexes of the byte-level BPE tokenizers llama.cpp knows, as tokenizer.json writes them before a
# ByteLevel(use_regex=false) step -> llama.cpp's pre-tokenizer name (llama.cpp's converter tells them apart by
# hashing their output; the regex is what makes that output)
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    _CONTRACTIONS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",  # Llama 3
    _CONTRACTIONS + r"\p{N}" + _TAIL: "qwen2",  # Qwen2, Qwen2.5, Qwen3
}


def _pre_tokenizer(pre: dict) -> str | None:
    """llama.cpp's name for a tokenizer.json pre_tokenizer, or None when llama.cpp has none that matches."""
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        return PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _tokenizer(writer, src: ExportSource, vocab: int) -> None:
    """tokenizer.ggml.*: a byte-level BPE tokenizer as llama.cpp's `gpt2` model with the pre-tokenizer its regex
    names (GPT-2's, Llama 3's, Qwen2's), or `none` without one."""
    import json

    files = {p.name: p for p in src.tokenizer_files()}
    if "tokenizer.json" not in files:
        writer.add_tokenizer_model("none")
        return
    tok = json.loads(files["tokenizer.json"].read_text())
    model, pre = tok.get("model", {}), tok.get("pre_tokenizer") or {}
    pre_name = _pre_tokenizer(pre) if model.get("type") == "BPE" else None
    require(pre_name is not None, "--format gguf carries byte-level BPE tokenizers with GPT-2's, Llama 3's or "
                                  f"Qwen2's pre-tokenizer (this one is {model.get('type')} with {pre.get('type')}); "
                                  "not yet others")
    from gguf import TokenType

    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [TokenType.UNUSED] * vocab
    for text, i in model["vocab"].items():
        if i < vocab:
            tokens[i], types[i] = text, TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    info = src.artifact.manifest.get("tokenizer") or {}
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(info.get(key), int):
            add(info[key])
    writer.add_add_bos_token(False)
    if "tokenizer_config.json" in files:
        template = json.loads(files["tokenizer_config.json"].read_text()).get("chat_template")
        if isinstance(template, str):
            writer.add_chat_template(template)


register_format(Format(
    name="gguf",
    summary="one GGUF file (llama.cpp's tensor names, metadata and tokenizer)",
    consumer="llama.cpp, llama-cpp-python and Ollama",
    architectures=tuple(ARCHITECTURES),
    schemes=("none (F32/BF16/F16, or --outtype q8_0/q4_0)", "int4 sym g32 (Q4_0, exact)",
             "int8 and fp8 (requantized to Q8_0, error reported)"),
    write=write,
    single_file=True,
    options={"outtype": OUTTYPES},
    notes="Refuses int4 in other settings (optimize with --group-size 32 --symmetric), Mistral or Phi-3 with a "
          "window shorter than the cache (--max-seq-len), rope scaling, partial rotary, and tokenizers other than "
          "byte-level BPE with GPT-2's, Llama 3's or Qwen2's splitting.",
))
