"""The prefill graph (`lmforge/runtime/prefill.py`): the final projection runs on the last position only, and
the prefill still gives Hugging Face's last-position logits and leaves the cache as the full graph does."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.ir.linear import as_linear
from lmforge.runtime.prefill import last_position_graph
from tests.conftest import make_model, random_ids


def _projection(gm):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0][0]
    while as_linear(node) is None:
        node = node.args[0]
    return as_linear(node)


def _prefill(eng, ids, mask=None):
    """Last-position logits of a prefill, and a decode step after it (which reads the cache it wrote)."""
    mask = torch.ones_like(ids) if mask is None else mask
    batch, length = ids.shape
    cache = eng._cache_for(batch)
    full = torch.zeros(batch, eng.max_seq_len, dtype=torch.long)
    full[:, :length] = mask
    with torch.inference_mode():
        logits = eng.prefill(cache, ids, full, length)
        positions = lmforge.ir.graph.position_ids(mask)[:, -1:] + 1
        step = eng.decode(cache, logits.argmax(-1)[:, None], positions, full, length)
    return logits, step


def test_projection_sees_one_position_and_logits_match_hf(arch, artifacts, hf_model):
    eng = lmforge.load(artifacts(arch))
    gm = last_position_graph(eng.ir)
    assert gm is not None
    x = _projection(gm).x
    assert x.target is torch.ops.aten.slice.Tensor and x.meta["spec"].shape[1] == 1
    assert _projection(eng.ir.gm).x.meta["spec"].shape[1] == "seq"  # the engine's own graph is unchanged
    ids = random_ids(2, 9)
    logits, step = _prefill(eng, ids)
    assert eng._prefill_gm not in (None, False)  # the prefill ran its own graph
    with torch.no_grad():
        ref = hf_model(ids).logits
        nxt = torch.cat([ids, ref[:, -1].argmax(-1, keepdim=True)], dim=1)
        ref_step = hf_model(nxt).logits[:, -1]
    torch.testing.assert_close(logits, ref[:, -1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, ref_step, rtol=1e-4, atol=1e-4)  # the cache the prefill wrote is right


def test_left_padded_rows_get_their_own_last_position(artifacts, hf_model):
    """Row 0 is padded on the left: its last position is still the batch's last column."""
    eng = lmforge.load(artifacts("llama"))
    ids = random_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits, _ = _prefill(eng, ids, mask)
    alone, _ = _prefill(eng, ids[:1, 3:])
    torch.testing.assert_close(logits[:1], alone, rtol=1e-4, atol=1e-4)


def test_a_quantized_tied_head_is_sliced_too(tmp_path):
    """With lm_head quantized (skip nothing) the projection is an int4 op; it still sees one position."""
    model = make_model("llama")
    art = lmforge.optimize(model, tmp_path / "q", max_seq_len=32, quant="int4", group_size=32, skip=[])
    eng = lmforge.load(art.path)
    gm = last_position_graph(eng.ir)
    assert gm is not None and _projection(gm).node.target is not torch.ops.aten.linear.default
    ids = random_ids(1, 6)
    logits, _ = _prefill(eng, ids)
    torch.testing.assert_close(logits, eng.forward(ids)[:, -1], rtol=1e-5, atol=1e-5)


def test_a_graph_ending_otherwise_has_no_prefill_graph(artifacts):
    """A reshape after the projection could depend on the sequence length: no prefill graph, and the
    engine falls back to the full graph."""
    eng = lmforge.load(artifacts("llama"))
    graph = eng.ir.graph
    out = next(n for n in graph.nodes if n.op == "output")
    logits = out.args[0][0]
    with graph.inserting_before(out):
        flat = graph.call_function(torch.ops.aten.reshape.default, (logits, [-1, logits.meta["spec"].shape[-1]]))
    flat.meta["spec"] = logits.meta["spec"]
    out.args = ((flat,),)
    eng.ir.gm.recompile()
    assert last_position_graph(eng.ir) is None
    ids = random_ids(1, 5)
    full = torch.zeros(1, eng.max_seq_len, dtype=torch.long)
    full[:, :5] = 1
    with torch.inference_mode():
        eng.prefill(eng._cache_for(1), ids, full, 5)  # runs the full graph
    assert eng._prefill_gm is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_is_unchanged(arch, artifacts):
    """The same greedy tokens with the prefill graph as with the full one."""
    ids = random_ids(2, 8, seed=3)
    eng = lmforge.load(artifacts(arch))
    with_prefill = eng.generate(ids, max_new_tokens=6)
    full = lmforge.load(artifacts(arch))
    full._prefill_gm = None
    assert torch.equal(with_prefill, full.generate(ids, max_new_tokens=6))
