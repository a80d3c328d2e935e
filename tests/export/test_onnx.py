"""`lmforge export --format onnx`, checked by its real consumers: ONNX Runtime runs a prefill and then decode
steps on the past keys/values it returned, matching lmforge's engine's logits on the same artifact, and
onnxruntime-genai's generator produces lmforge's greedy tokens."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from tests.conftest import VOCAB, make_model, random_ids, sharpened

ort = pytest.importorskip("onnxruntime")
og = pytest.importorskip("onnxruntime_genai")
pytest.importorskip("onnxscript")

# ONNX Runtime against lmforge's engine on one float32 artifact (logits of magnitude ~2): the same float32
# arithmetic summed in other orders. Measured 5e-7 to 9e-7 for the float graphs and for int4/int8 (MatMulNBits
# dequantizes to the same float32 weights). A bfloat16 artifact runs in float32 in ONNX Runtime and rounds to
# bfloat16 after every op in lmforge: measured 0.05 on the demo model's logits of magnitude 10.
F32_ATOL = 1e-4
BF16_ATOL = 0.15
# with --activations int8 (the default), MatMulNBits rounds each block of activations to int8: measured 0.013 to
# 0.020 on the tiny Llama's logits of magnitude ~2 (int4 and int8 weights), 0.12 on the demo model's of 10
INT8_ACTIVATIONS_ATOL = 0.08


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return sharpened(Phi3ForCausalLM(Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval())


def _llama_wide():
    """intermediate 128: every layer takes groups of 32 and 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return sharpened(LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False)).eval())


_arts: dict[tuple, str] = {}
_made: dict[tuple, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def made(tmp_path_factory, artifacts):
    """(model, dtype, activations, quant settings) -> (artifact, onnx dir); an artifact is optimized once for
    all its exports, and conftest's architectures reuse its artifacts."""

    def get(model: str, dtype: str = "float32", activations: str = "int8", **quant):
        art_key = (model, dtype, tuple(sorted(quant.items())))
        if art_key not in _arts:
            if model in ("llama", "qwen2", "mistral", "gpt2") and not quant:
                _arts[art_key] = artifacts(model, dtype)
            else:
                _arts[art_key] = str(tmp_path_factory.mktemp(f"onnx-{model}") / "art")
                source = {"phi3": _phi3, "llama-wide": _llama_wide}[model]()
                lmforge.optimize(source, _arts[art_key], dtype=dtype, max_seq_len=64, **quant)
        key = (*art_key, activations)
        if key not in _made:
            out = tmp_path_factory.mktemp(f"onnx-{model}-{activations}") / "onnx"
            lmforge.export(_arts[art_key], format="onnx", output_dir=out, activations=activations)
            _made[key] = (_arts[art_key], str(out))
        return _made[key]

    return get


def _session(onnx_dir: str):
    return ort.InferenceSession(str(Path(onnx_dir) / "model.onnx"), providers=["CPUExecutionProvider"])


def _ort_logits(onnx_dir: str, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits (B, S, V) of a prefill of `prefill` tokens, then one decode step per remaining token, each on the
    past keys/values the previous run returned."""
    sess = _session(onnx_dir)
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    batch = ids.shape[0]
    past = {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in pasts}
    out, start = [], 0
    for stop in [prefill, *range(prefill + 1, ids.shape[1] + 1)]:
        chunk = ids[:, start:stop].numpy()
        feeds = {"input_ids": chunk, "attention_mask": np.ones((batch, stop), np.int64),
                 "position_ids": np.tile(np.arange(start, stop, dtype=np.int64), (batch, 1)), **past}
        results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        past = {name: results[name.replace("past_key_values.", "present.")] for name in past}
        out.append(torch.from_numpy(results["logits"]))
        start = stop
    return torch.cat(out, 1)


def _genai_greedy(onnx_dir: str, ids: list[int], n: int) -> list[int]:
    model = og.Model(onnx_dir)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def _mine(art: str, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, list[int]]:
    eng = lmforge.load(art)
    return eng.forward(ids)[0].float(), eng.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()


def _ops(onnx_dir: str) -> Counter:
    import onnx

    model = onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False)
    return Counter(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def _attribute(onnx_dir: str, op_type: str, name: str):
    import onnx

    model = onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False)
    node = next(n for n in model.graph.node if n.op_type == op_type)
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.mark.parametrize("model", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
def test_float32_export_runs_in_onnx_runtime_and_genai(made, model):
    art, onnx_dir = made(model)
    ids = random_ids(1, 11)
    ours, greedy = _mine(art, ids, 12)
    torch.testing.assert_close(_ort_logits(onnx_dir, ids, 7)[0], ours, atol=F32_ATOL, rtol=0)
    assert _genai_greedy(onnx_dir, ids[0].tolist(), 12) == greedy


def test_graph_holds_onnx_runtime_fused_ops_and_passes_the_checker(made):
    from lmforge.export.onnx_schemas import check

    art, onnx_dir = made("llama")
    check(str(Path(onnx_dir) / "model.onnx"))
    ops = _ops(onnx_dir)
    layers = 2
    assert ops["com.microsoft:GroupQueryAttention"] == layers
    assert ops["com.microsoft:RotaryEmbedding"] == 2 * layers  # q and k of each layer
    assert ops["com.microsoft:SkipSimplifiedLayerNormalization"] == 2 * layers  # after attention and MLP (+ final)
    assert ops["SimplifiedLayerNormalization"] == 1  # the first layer's input norm
    sess = _session(onnx_dir)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert [o.name for o in sess.get_outputs()] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert sess.get_inputs()[3].shape == ["batch_size", 2, "past_sequence_length", 16]  # BNSH
    config = json.loads((Path(onnx_dir) / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["context_length"] == 64
    assert config["model"]["type"] == "llama" and config["search"]["do_sample"] is False


def test_sliding_window_reaches_group_query_attention(made):
    _, onnx_dir = made("mistral")  # conftest's Mistral: window 6, shorter than the 11-token sequences above
    assert _attribute(onnx_dir, "GroupQueryAttention", "local_window_size") == 6


def test_batch_of_two(made):
    art, onnx_dir = made("qwen2")
    ids = random_ids(2, 9, seed=4)
    ours = lmforge.load(art).forward(ids).float()
    torch.testing.assert_close(_ort_logits(onnx_dir, ids, 5), ours, atol=F32_ATOL, rtol=0)


QUANTS = {"int4-sym-g32": {"quant": "int4", "group_size": 32, "symmetric": True},
          "int4-asym-g64": {"quant": "int4", "group_size": 64},  # fractional zero points: MatMulNBits' float ones
          "int4-int-zp": {"quant": "int4", "group_size": 64, "zero_points": "int"},  # packed uint8 zero points
          "int8": {"quant": "int8"}}


@pytest.mark.parametrize("name", list(QUANTS))
def test_quantized_layers_become_matmul_nbits(made, name):
    """With float activations, ONNX Runtime's numbers are lmforge's: the same dequantized weights."""
    import onnx

    quant = QUANTS[name]
    art, onnx_dir = made("llama-wide", activations="float", **quant)
    model = onnx.load(str(Path(onnx_dir) / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 14  # every linear of both layers, and the lm_head
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == (8 if quant["quant"] == "int8" else 4) and attrs["accuracy_level"] == 0
    if quant["quant"] == "int4":
        assert attrs["block_size"] == quant["group_size"]
        has_zero_points = len(nbits[0].input) > 3 and nbits[0].input[3] != ""
        assert has_zero_points == (not quant.get("symmetric", False))
    ids = random_ids(1, 11)
    ours, greedy = _mine(art, ids, 12)
    torch.testing.assert_close(_ort_logits(onnx_dir, ids, 7)[0], ours, atol=F32_ATOL, rtol=0)
    assert _genai_greedy(onnx_dir, ids[0].tolist(), 12) == greedy


@pytest.mark.parametrize("name", ["int4-asym-g64"])
def test_int8_activations_by_default(made, name):
    """The default: ONNX Runtime's fast CPU path, activations rounded to int8 per block (accuracy_level 4)."""
    art, onnx_dir = made("llama-wide", **QUANTS[name])
    assert _attribute(onnx_dir, "MatMulNBits", "accuracy_level") == 4
    ids = random_ids(1, 11)
    ours, greedy = _mine(art, ids, 12)
    torch.testing.assert_close(_ort_logits(onnx_dir, ids, 7)[0], ours, atol=INT8_ACTIVATIONS_ATOL, rtol=0)
    assert _genai_greedy(onnx_dir, ids[0].tolist(), 12) == greedy


def test_integer_zero_points_are_packed_uint8(made):
    import onnx
    from onnx import numpy_helper

    _, onnx_dir = made("llama-wide", activations="float", **QUANTS["int4-int-zp"])
    model = onnx.load(str(Path(onnx_dir) / "model.onnx"))
    init = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    zp = numpy_helper.to_array(init[node.input[3]])
    assert zp.dtype == np.uint8 and zp.shape[1] == 1  # 64 / 64 = 1 block a row: two nibbles in one byte


def test_bfloat16_artifact_runs_in_float32(made):
    art, onnx_dir = made("llama", "bfloat16")
    ids = random_ids(1, 9)
    ours = lmforge.load(art).forward(ids)[0].float()
    torch.testing.assert_close(_ort_logits(onnx_dir, ids, 5)[0], ours, atol=BF16_ATOL, rtol=0)


def test_demo_model_with_its_tokenizer(tmp_path):
    lmforge.optimize(None, tmp_path / "demo", dtype="float32", max_seq_len=128)
    lmforge.export(tmp_path / "demo", format="onnx", output_dir=tmp_path / "onnx")
    model = og.Model(str(tmp_path / "onnx"))
    tokenizer = og.Tokenizer(model)
    eng = lmforge.load(tmp_path / "demo")
    text = "The for statement"
    ids = eng.tokenizer.encode(text).ids
    assert list(tokenizer.encode(text)) == ids
    mine = eng.generate(torch.tensor([ids]), max_new_tokens=16)[0, len(ids):].tolist()
    assert _genai_greedy(str(tmp_path / "onnx"), ids, 16)[:len(mine)] == mine
    assert tokenizer.decode(np.array(mine, dtype=np.int32)) == eng.tokenizer.decode(mine)


def test_refusals(tmp_path):
    lmforge.optimize(make_model("llama"), tmp_path / "fp8", dtype="float32", max_seq_len=64, quant="fp8")
    with pytest.raises(LmforgeError, match="does not carry fp8.*--quant int4 or int8"):
        lmforge.export(tmp_path / "fp8", format="onnx", output_dir=tmp_path / "fp8-onnx")
    with pytest.raises(LmforgeError, match="--outtype does not apply to --format onnx"):
        lmforge.export(tmp_path / "fp8", format="onnx", output_dir=tmp_path / "x", outtype="f16")
    with pytest.raises(LmforgeError, match="--activations must be one of int8, float"):
        lmforge.export(tmp_path / "fp8", format="onnx", output_dir=tmp_path / "x", activations="int4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8"]  # nothing half-written
