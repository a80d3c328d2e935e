"""The embedded demo model: shipped in the package, small, shardable, and a real (trained) Llama."""

from __future__ import annotations

import json
import math

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
    """Held-out perplexity far below the uniform 2048-way guess, measured here on the shipped weights."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    path = model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = torch.tensor([tok.encode((path / "heldout.txt").read_text()[:4000]).ids[:512]])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 200 < 2048
    assert load_file(str(path / "model.safetensors"))  # plain safetensors
