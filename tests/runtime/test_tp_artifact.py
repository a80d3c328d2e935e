"""Tensor-parallel artifacts: per-rank weight files, the manifest's tp, resharding on load (N -> 1, 1 -> N,
2 -> 4), generation equal to Hugging Face's, and one-line errors for damaged shards.

The ranks run as threads of this process (`tests.conftest.run_ranks`); `test_tp_gloo.py` runs real processes.
"""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.errors import ArtifactError, LmforgeError
from lmforge.ir.tensor_parallel import TensorParallelSummary
from lmforge.runtime.artifact import load_graph, read_manifest
from tests.conftest import make_model, random_ids, run_ranks

_arts: dict = {}


def _artifact(tmp_path_factory, arch: str, tp: int, quant: str | None = None):
    key = (arch, tp, quant)
    if key not in _arts:
        model = make_model(arch)
        out = tmp_path_factory.mktemp(f"{arch}-tp{tp}") / "art"
        kwargs = dict(quant=quant, group_size=32, skip=[]) if quant else {}
        lmforge.optimize(model, out, max_seq_len=64, tp=tp, **kwargs)
        _arts[key] = (model, out)
    return _arts[key]


def _ranks(path, tp: int, fn):
    return run_ranks(lambda r: fn(lmforge.load(path, tp=tp, rank=r)), tp)


def test_layout_on_disk(tmp_path_factory):
    _, path = _artifact(tmp_path_factory, "llama", 2)
    manifest = json.loads((path / "manifest.json").read_text())
    tp = manifest["tensor_parallel"]
    assert tp["tp"] == 2 and tp["files"] == ["model.rank0.safetensors", "model.rank1.safetensors"]
    assert tp["all_reduces_per_step"] == 5 and tp["bytes_all_reduced_per_token"] == 5 * 64 * 4
    assert set(manifest["files"]) >= {"model.safetensors", "model.rank0.safetensors", "model.rank1.safetensors"}
    graph = json.loads((path / "graph.json").read_text())
    assert graph["tensor_parallel"]["tp"] == 2
    assert any(n.get("target") == "lmforge.all_reduce.default" for n in graph["nodes"])
    from safetensors import safe_open

    with safe_open(str(path / "model.rank1.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (32, 64)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.q_proj.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").shape == (64,)
    _, one = _artifact(tmp_path_factory, "llama", 1)
    whole = json.loads((one / "manifest.json").read_text())
    assert manifest["params"] == whole["params"]  # counted whole, not per rank
    assert TensorParallelSummary.from_json(tp).to_json() == tp
    loaded = load_graph(read_manifest(path))  # the cuts' roles (a table's row offsets: not parameters) survive
    assert loaded.param_count() == manifest["params"]
    assert {c.role for c in loaded.tensor_parallel.weights.values()} == {"slice", "offset"}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_ranks_match_hf_and_one_process_reshards(tmp_path_factory, arch):
    model, path = _artifact(tmp_path_factory, arch, 2)
    ids = random_ids(2, 8)
    with torch.no_grad():
        expected = model(ids).logits
    for got in _ranks(path, 2, lambda eng: eng.forward(ids)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    merged = lmforge.load(path)  # a process on its own: 2 -> 1
    assert merged.tp == 1
    torch.testing.assert_close(merged.forward(ids), expected, rtol=0, atol=1e-5)


def test_reshard_one_to_two_and_two_to_four(tmp_path_factory):
    model, one = _artifact(tmp_path_factory, "llama", 1)
    _, two = _artifact(tmp_path_factory, "llama", 2)
    ids = random_ids(1, 6)
    with torch.no_grad():
        expected = model(ids).logits
    for path, tp in ((one, 2), (two, 4)):
        results = _ranks(path, tp, lambda eng: (eng.tp, eng.forward(ids)))
        for eng_tp, got in results:
            assert eng_tp == tp
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_int4_tp2_matches_int4_tp1(tmp_path_factory):
    _, one = _artifact(tmp_path_factory, "llama", 1, "int4")
    _, two = _artifact(tmp_path_factory, "llama", 2, "int4")
    ids = random_ids(2, 7)
    expected = lmforge.load(one).forward(ids)
    for got in _ranks(two, 2, lambda eng: eng.forward(ids)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(lmforge.load(two).forward(ids), expected, rtol=0, atol=1e-5)  # 2 -> 1


def test_generate_greedy_and_sampled(tmp_path_factory):
    model, path = _artifact(tmp_path_factory, "qwen2", 2)
    ids = random_ids(1, 5)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for got in _ranks(path, 2, lambda eng: eng.generate(ids, max_new_tokens=8, eos_token_id=-1)):
        assert torch.equal(got, expected)

    def sampled(eng):  # each rank's own generator differs: the ranks still agree, on rank 0's draw
        gen = torch.Generator().manual_seed(eng.rank)
        return eng.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, generator=gen, eos_token_id=-1)

    a, b = _ranks(path, 2, sampled)
    assert torch.equal(a, b)


def test_damaged_rank_file_is_one_line(tmp_path_factory, tmp_path):
    import shutil

    _, path = _artifact(tmp_path_factory, "llama", 2)
    copy = tmp_path / "art"
    shutil.copytree(path, copy)
    (copy / "model.rank1.safetensors").write_bytes((copy / "model.rank1.safetensors").read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"model\.rank1\.safetensors is truncated or corrupt"):
        lmforge.load(copy, tp=2, rank=0)


def test_bad_tp_arguments(tmp_path_factory):
    _, path = _artifact(tmp_path_factory, "llama", 2)
    with pytest.raises(ArtifactError, match="rank 2 is outside tp=2"):
        lmforge.load(path, tp=2, rank=2)
    with pytest.raises(LmforgeError, match="tp must be a whole number of ranks"):
        lmforge.optimize(make_model("llama"), path.parent / "x", tp=0)
