"""The embedded demo model: shipped in the package, small, shardable, and a real (trained) Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.demo import model_dir


def test_shipped_files_and_shape():
    path = model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "heldout.txt", "training.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    heads = config["num_attention_heads"]
    assert heads % 2 == 0 and heads % 4 == 0  # shardable at tp 2 and 4
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 12e6  # a few MB


def test_it_was_trained():
    """Held-out perplexity, measured here on the shipped weights as scripts/train_demo_model.py measures it
    (non-overlapping 256-token windows over all of heldout.txt), is the figure training.json records, and
    far below the perplexity of the best context-free guess: the held-out text's own token frequencies."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    path = model_dir()
    record = json.loads((path / "training.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = torch.tensor(tok.encode((path / "heldout.txt").read_text()).ids)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 256):
            window = ids[start:start + 256][None]
            logits = model(input_ids=window).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    perplexity = math.exp(nll / count)
    assert count == record["eval_tokens"]["heldout"]
    assert perplexity == pytest.approx(record["bf16_reloaded"]["heldout_perplexity"], rel=1e-3)
    freq = torch.bincount(ids).double() / len(ids)
    freq = freq[freq > 0]
    unigram = math.exp(-(freq * freq.log()).sum().item())  # ~300 on this text; random weights give ~2000
    assert perplexity < unigram / 3, (perplexity, unigram)
    assert set(load_file(str(path / "model.safetensors"))) == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
