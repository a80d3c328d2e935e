"""Capture: HF model -> GraphIR under the calling convention, with the KV cache as graph inputs."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import CaptureError
from lmforge.ir.capture import capture
from lmforge.ir.graph import INPUT_NAMES
from lmforge.ir.spec import TensorSpec
from tests.conftest import make_model, random_ids

aten = torch.ops.aten


def _caches(ir, batch, length):
    out = []
    for layer in ir.kv.layers:
        out.append(torch.zeros(batch, layer.n_kv_heads, length, layer.k_head_dim, dtype=ir.kv.dtype))
        out.append(torch.zeros(batch, layer.n_kv_heads, length, layer.v_head_dim, dtype=ir.kv.dtype))
    return out


def run_chunks(ir, ids, chunks):
    """Feed `ids` through the captured graph in chunks of the given sizes, through one cache."""
    batch, total = ids.shape
    caches = _caches(ir, batch, total)
    mask = torch.ones(batch, total, dtype=torch.long)
    pos = torch.arange(total).expand(batch, total)
    outs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            outs.append(ir.gm(ids[:, start:end], pos[:, start:end], mask[:, :end], *[c[:, :, :end] for c in caches])[0])
            start = end
    return torch.cat(outs, dim=1)


def assert_matches_hf(ir, model, ids, chunks, dtype: str = "float32") -> None:
    """The graph, fed `ids` in `chunks` through one cache, against HF eager's logits: within 1e-4 in float32;
    in a half dtype, within 5% of the logits' largest magnitude."""
    with torch.no_grad():
        want = model(ids).logits.float()
    got = run_chunks(ir, ids, chunks).float()
    if dtype == "float32":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        assert (got - want).abs().max() <= 0.05 * want.abs().max(), (got - want).abs().max()


@pytest.fixture(scope="module")
def captured(hf_model):
    return capture(hf_model)


def test_convention_and_specs(captured, hf_model):
    ir = captured
    names = [n.name for n in ir.graph.nodes if n.op == "placeholder"]
    n_layers = hf_model.config.num_hidden_layers if hasattr(hf_model.config, "num_hidden_layers") else hf_model.config.n_layer
    assert names == list(INPUT_NAMES) + [f"{kv}_cache_{i}" for i in range(n_layers) for kv in ("k", "v")]
    ids = next(n for n in ir.graph.nodes if n.name == "input_ids")
    assert ids.meta["spec"] == TensorSpec(("batch", "seq"), torch.int64)
    k0 = next(n for n in ir.graph.nodes if n.name == "k_cache_0")
    assert k0.meta["spec"].shape[0] == "batch" and k0.meta["spec"].shape[2] == "kv_len"
    # every node but the output carries a spec
    assert all("spec" in n.meta for n in ir.graph.nodes if n.op != "output")


def test_cache_writes_are_in_place_on_inputs(captured):
    writes = [n for n in captured.graph.nodes if n.target is aten.index_copy_.default]
    assert len(writes) == 2 * len(captured.kv.layers)
    assert {w.args[0].name for w in writes} == {n.name for n in captured.graph.nodes if n.name.startswith(("k_cache", "v_cache"))}
    out = next(n for n in captured.graph.nodes if n.op == "output")
    assert len(out.args[0]) == 1  # logits only: no cache outputs left


def test_weights_keep_source_names(captured, hf_model):
    names = set(captured.weight_names.values())
    params = {name for name, _ in hf_model.named_parameters(remove_duplicate=False)}  # tied: either name
    assert names & params and all(n in params or "inv_freq" in n or n.startswith("lmforge.") for n in names)


def test_kv_geometry_is_measured(captured, hf_model):
    cfg = hf_model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hidden = getattr(cfg, "hidden_size", None)
    assert all(l.n_kv_heads == heads and l.k_head_dim == hidden // cfg.num_attention_heads for l in captured.kv.layers)


def test_prefill_matches_hf(captured, hf_model):
    ids = random_ids(2, 11)
    with torch.no_grad():
        ref = hf_model(ids).logits
    out = run_chunks(captured, ids, [11])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_chunked_through_cache_matches_hf(captured, hf_model):
    """Prefill 7, then 1 token at a time, then 3: the cache carries everything between calls."""
    ids = random_ids(2, 13, seed=3)
    with torch.no_grad():
        ref = hf_model(ids).logits
    out = run_chunks(captured, ids, [7, 1, 1, 1, 3])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_not_a_transformers_model():
    with pytest.raises(CaptureError, match="not a transformers model"):
        capture(torch.nn.Linear(3, 3))


def test_failing_construct_is_named_in_one_line():
    model = make_model("llama")
    original = model.model.forward

    def data_dependent(*args, **kwargs):  # a branch on a tensor's value cannot be exported
        out = original(*args, **kwargs)
        if out.last_hidden_state.sum() > 0:
            return out
        return out

    model.model.forward = data_dependent
    with pytest.raises(CaptureError) as err:
        capture(model)
    message = str(err.value)
    assert "\n" not in message and "LlamaForCausalLM" in message
    assert "data-dependent" in message.lower() or "guard" in message.lower()
