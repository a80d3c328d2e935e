"""`lmforge export --format gguf`, checked by its real consumer: llama.cpp (through llama-cpp-python) loads the
file, and its logits and greedy tokens are lmforge's engine's on the same artifact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from tests.conftest import make_model, random_ids, sharpened

llama_cpp = pytest.importorskip("llama_cpp")

# logits of magnitude ~2 and spread ~0.5 (tiny random models), llama.cpp against lmforge's engine on the same
# artifact. Measured: F32 5e-4 to 1e-3 (two float32 implementations, summing in their own orders), F16 weights
# 1.4e-3, BF16 weights 8.7e-3, Q8_0 and Q4_0 0.021 to 0.031 (llama.cpp rounds the activations of quantized
# matmuls to Q8_0 blocks; lmforge keeps them float). Skipping the q/k row permutation gives 0.24 to 0.29.
F32_ATOL = 3e-3
F16_ATOL = 5e-3
BF16_ATOL = 0.03
QUANT_ATOL = 0.08


def _mistral_full_window():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=131, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                            sliding_window=None)).eval()


def _llama_wide():
    """intermediate 128, so every layer (down_proj too) takes groups of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    return sharpened(model.eval())


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=256, tie_word_embeddings=True))
    return sharpened(model.eval())


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return sharpened(Phi3ForCausalLM(Phi3Config(
        vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval())


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=131, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                         max_position_embeddings=256)).eval()
    with torch.no_grad():  # norms away from Gemma's zero init (1 + w), so a lost norm weight would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return sharpened(model)


MODELS = {"llama": lambda: make_model("llama"), "phi3": _phi3, "gemma": _gemma, "qwen2": lambda: make_model("qwen2"), "mistral": _mistral_full_window,
          "llama-wide": _llama_wide, "qwen3": _qwen3}
_made: dict[tuple, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    def get(model: str, outtype: str = "auto", dtype: str = "float32", **quant):
        key = (model, outtype, dtype, tuple(sorted(quant.items())))
        if key not in _made:
            base = tmp_path_factory.mktemp(f"{model}-{outtype}")
            lmforge.optimize(MODELS[model](), base / "art", dtype=dtype, max_seq_len=64, **quant)
            lmforge.export(base / "art", format="gguf", output_dir=base / "model.gguf", outtype=outtype)
            _made[key] = (str(base / "art"), str(base / "model.gguf"))
        return _made[key]

    return get


def _llama(path: str):
    return llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2,
                           seed=0)


def _their_logits(path: str, ids: list[int]) -> torch.Tensor:
    llm = _llama(path)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def _their_greedy(path: str, ids: list[int], n: int) -> list[int]:
    llm = _llama(path)
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize("model", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma"])
def test_float32_export_runs_in_llama_cpp(made, model):
    art, gguf = made(model)
    ids = random_ids(1, 11)[0].tolist()
    ours = lmforge.load(art).forward(torch.tensor([ids]))[0].float()
    torch.testing.assert_close(_their_logits(gguf, ids), ours, atol=F32_ATOL, rtol=0)
    mine = lmforge.load(art).generate(torch.tensor([ids]), max_new_tokens=12)[0, len(ids):].tolist()
    assert _their_greedy(gguf, ids, 12) == mine


def test_f16_and_bf16_weights(made):
    ids = random_ids(1, 9, seed=3)[0].tolist()
    for outtype, atol in (("f16", F16_ATOL), ("bf16", BF16_ATOL)):
        art, gguf = made("llama", outtype)
        eng = lmforge.load(art)
        torch.testing.assert_close(_their_logits(gguf, ids), eng.forward(torch.tensor([ids]))[0].float(), atol=atol,
                                   rtol=0)
        mine = eng.generate(torch.tensor([ids]), max_new_tokens=10)[0, len(ids):].tolist()
        assert _their_greedy(gguf, ids, 10) == mine, outtype


def test_q4_0_from_symmetric_group_32_int4_is_exact(made):
    from gguf import GGUFReader, quants

    # bfloat16 scales, which float16 holds exactly (float32 ones would be rounded: the summary reports by how much)
    art, gguf = made("llama-wide", dtype="bfloat16", quant="int4", group_size=32, symmetric=True)
    reader = GGUFReader(gguf)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0" and types["token_embd.weight"] == "BF16"
    from safetensors.torch import load_file

    from lmforge.quant.int4 import Int4Weight, dequantize

    weights = load_file(str(Path(art) / "model.safetensors"))
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")  # v: no row permutation
    theirs = torch.from_numpy(quants.dequantize(t.data, t.tensor_type)).reshape(32, 64)
    layer = "model.layers.1.self_attn.v_proj"
    mine = dequantize(Int4Weight(weights[f"{layer}.qweight"], weights[f"{layer}.scales"], None, 32))
    assert torch.equal(theirs, mine)
    ids = random_ids(1, 11)[0].tolist()
    ours = lmforge.load(art).forward(torch.tensor([ids]))[0].float()
    torch.testing.assert_close(_their_logits(gguf, ids), ours, atol=QUANT_ATOL, rtol=0)


def test_q8_0_and_requantized_int8_stay_close(made):
    ids = random_ids(1, 11)[0].tolist()
    for outtype, quant in (("q8_0", {}), ("auto", {"quant": "int8"})):
        art, gguf = made("llama-wide", outtype, **quant)
        ours = lmforge.load(art).forward(torch.tensor([ids]))[0].float()
        torch.testing.assert_close(_their_logits(gguf, ids), ours, atol=QUANT_ATOL, rtol=0)


def test_demo_model_tokenizer_and_text(tmp_path):
    art = lmforge.optimize(None, tmp_path / "demo", dtype="float32")
    lmforge.export(tmp_path / "demo", format="gguf", output_dir=tmp_path / "demo.gguf")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "demo.gguf"), n_ctx=256, verbose=False, n_threads=2)
    eng = lmforge.load(tmp_path / "demo")
    text = "The for statement"
    ids = eng.tokenizer.encode(text).ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    theirs = llm.create_completion(text, max_tokens=16, temperature=0.0, top_k=1)["choices"][0]["text"]
    mine = eng.tokenizer.decode(eng.generate(torch.tensor([ids]), max_new_tokens=16)[0, len(ids):].tolist())
    assert theirs == mine


# --- what it refuses -------------------------------------------------------------------------------------


def test_refusals(made, tmp_path):
    lmforge.optimize(make_model("mistral"), tmp_path / "swa", dtype="float32", max_seq_len=64)
    with pytest.raises(LmforgeError, match="no sliding window.*--max-seq-len 6"):
        lmforge.export(tmp_path / "swa", format="gguf", output_dir=tmp_path / "swa.gguf")
    lmforge.optimize(make_model("llama"), tmp_path / "g64", dtype="float32", max_seq_len=64, quant="int4",
                     group_size=64)
    with pytest.raises(LmforgeError, match="--group-size 32 --symmetric"):
        lmforge.export(tmp_path / "g64", format="gguf", output_dir=tmp_path / "g64.gguf")
    lmforge.optimize(make_model("gpt2"), tmp_path / "gpt2", dtype="float32", max_seq_len=64)
    with pytest.raises(LmforgeError, match="does not carry model type 'gpt2'"):
        lmforge.export(tmp_path / "gpt2", format="gguf", output_dir=tmp_path / "gpt2.gguf")
    art, _ = made("llama")
    with pytest.raises(LmforgeError, match="--outtype does not apply to --format hf"):
        lmforge.export(art, format="hf", output_dir=tmp_path / "x", outtype="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g64", "gpt2", "swa"]  # nothing half-written


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_pre_tokenizers(tmp_path, pre):
    """A byte-level BPE that splits with Llama 3's or Qwen2's regex (a Split step before ByteLevel) is written with
    llama.cpp's name for that pre-tokenizer, and llama.cpp's tokenizer then gives the tokenizer's own ids."""
    from gguf import GGUFReader
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lmforge.export.gguf import PRE_TOKENIZERS

    regex = next(r for r, name in PRE_TOKENIZERS.items() if name == pre)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = ["The year 2024 had 366 days; it's 12345 steps.", "We'll see what they've done:\n\n  x = 42 ", "Ünïcödé wörds"]
    tok.train_from_iterator(text * 50, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                         special_tokens=["<|end|>"]))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=0)).eval()
    lmforge.optimize(model, tmp_path / "art", dtype="float32", max_seq_len=64,
                     tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>"))
    lmforge.export(tmp_path / "art", format="gguf", output_dir=tmp_path / "m.gguf")
    field = GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == pre
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, n_threads=2)
    for sample in [*text, "Numbers 1234567 and 89, then it'd end."]:
        assert llm.tokenize(sample.encode(), add_bos=False, special=False) == tok.encode(sample).ids, sample


def test_other_pre_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d e"] * 10, trainers.BpeTrainer(vocab_size=40))
    lmforge.optimize(make_model("llama"), tmp_path / "art", dtype="float32", max_seq_len=64,
                     tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok))
    with pytest.raises(LmforgeError, match="GPT-2's, Llama 3's or Qwen2's pre-tokenizer.*BPE with Whitespace"):
        lmforge.export(tmp_path / "art", format="gguf", output_dir=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
