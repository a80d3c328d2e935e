"""shard{tp=N}: every rank's graph, run together (one thread per rank), gives Hugging Face eager's logits.

Llama, Mistral (sliding window), Qwen2 (one key/value head: replicated at tp 2 and 4) and GPT-2 (fused q/k/v,
Conv1D weights, biases, a tied and padded vocabulary), in float32 and with int4 weights; the IR before and
after shows the column/row decisions, the rewritten head counts and the collectives; the reasons for
refusing a tp are one line; unsharding gives the one-device graph back.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.codegen.collectives import all_gather, all_reduce
from lmforge.errors import PassError
from lmforge.ir.capture import capture
from lmforge.passes import PassManager, default_pipeline, parse_pipeline
from lmforge.passes.shard import assemble, for_rank, plan, unshard
from tests.conftest import VOCAB, make_model, random_ids, run_ranks

aten = torch.ops.aten
_cache: dict = {}


def _optimized(arch: str, quant: str | None = None):
    """(HF model, the one-device graph after the default pipeline), cached; callers copy before changing it."""
    key = (arch, quant)
    if key not in _cache:
        model = make_model(arch)
        ir = capture(model)
        options = parse_pipeline(f"quantize{{{quant}}}")[0].options if quant else None
        PassManager(default_pipeline(None, 64, options)).run(ir)
        _cache[key] = (model, ir)
    return _cache[key]


def _sharded(arch: str, tp: int, quant: str | None = None):
    model, ir = _optimized(arch, quant)
    ir = copy.deepcopy(ir)
    PassManager(f"shard{{tp={tp}}}").run(ir)
    return model, ir


def _caches(ir, batch: int, length: int) -> list[torch.Tensor]:
    return [torch.zeros(batch, l.n_kv_heads, length, d) for l in ir.kv.layers for d in (l.k_head_dim, l.v_head_dim)]


def _logits(ir, ids: torch.Tensor) -> torch.Tensor:
    batch, seq = ids.shape
    positions = torch.arange(seq).expand(batch, seq)
    return ir.gm(ids, positions, torch.ones_like(ids), *_caches(ir, batch, seq))[0]


def _run_sharded(ir, ids: torch.Tensor, tp: int) -> list[torch.Tensor]:
    return run_ranks(lambda r: _logits(for_rank(ir, r), ids), tp)


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama", 4), ("mistral", 2), ("qwen2", 2), ("qwen2", 4),
                                     ("gpt2", 2), ("gpt2", 4)])
def test_sharded_logits_equal_hf(arch, tp):
    model, ir = _sharded(arch, tp)
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = model(ids).logits
    for got in _run_sharded(ir, ids, tp):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert ir.tensor_parallel.replicated == {}


@pytest.mark.parametrize("arch, quant", [("llama", "scheme=int4,group_size=32,skip="),
                                         ("gpt2", "scheme=int4,group_size=32,skip="), ("qwen2", "scheme=int8,skip=")])
def test_weight_only_sharded_equals_unsharded(arch, quant):
    """int4 by whole groups and int8 with its per-row scales: each rank's slice computes its part of the sums
    exactly, so the sharded logits are the unsharded ones up to summation order."""
    _, whole = _optimized(arch, quant)
    _, ir = _sharded(arch, 2, quant)
    ids = random_ids(2, 9)
    expected = _logits(whole, ids)
    op = getattr(torch.ops.lmforge, f"{quant.split(',')[0].removeprefix('scheme=')}_linear").default
    assert any(n.target is op for n in ir.graph.nodes)
    for got in _run_sharded(ir, ids, 2):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_fp8_sharded_is_close():
    """fp8 row-parallel layers scale activations per rank's slice (finer than per token), so the result
    differs from the unsharded graph by fp8 rounding only."""
    _, whole = _optimized("llama", "scheme=fp8")
    _, ir = _sharded("llama", 2, "scheme=fp8")
    ids = random_ids(1, 5)
    expected = _logits(whole, ids)
    for got in _run_sharded(ir, ids, 2):
        assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def _weight(ir, name: str, rank: int = 0) -> torch.Tensor:
    attr = next(a for a, n in ir.weight_names.items() if n == name)
    return ir.tensor_parallel.rank_weights[rank].get(attr, ir.weight(attr))


def test_llama_ir_column_row_and_collectives():
    model, ir = _sharded("llama", 2)
    w = dict(model.named_parameters())
    q = "model.layers.0.self_attn.q_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    for r in range(2):  # q: output rows cut in whole heads; down: input columns
        torch.testing.assert_close(_weight(ir, q, r), w[q][r * 32:(r + 1) * 32])
        torch.testing.assert_close(_weight(ir, down, r), w[down][:, r * 56:(r + 1) * 56])
    assert _weight(ir, "model.norm.weight").shape == (64,)  # replicated
    ops = [n.target for n in ir.graph.nodes if n.op == "call_function"]
    assert ops.count(all_reduce) == 5 and ops.count(all_gather) == 1  # embeddings, o_proj, down_proj; the logits
    table = "model.embed_tokens.weight"  # vocab-parallel: 131 rows padded to 132, 66 a rank
    torch.testing.assert_close(_weight(ir, table, 0), w[table][:66])
    torch.testing.assert_close(_weight(ir, table, 1)[:65], w[table][66:])
    assert not _weight(ir, table, 1)[65].any()
    cache = next(n for n in ir.graph.nodes if n.name == "k_cache_0")
    assert cache.meta["spec"].shape[1] == 1 and ir.kv.layers[0].n_kv_heads == 1  # 2 kv heads over 2 ranks
    out = next(n for n in ir.graph.nodes if n.op == "output").args[0][0]
    assert out.target is aten.slice.Tensor and out.meta["spec"].shape[-1] == VOCAB  # 131 padded to 132, cut back
    stats = ir.history[-1]["stats"]
    assert stats["column-layers"] == 11 and stats["row-layers"] == 4  # 5 per layer + lm_head; 2 per layer


def test_gqa_kv_heads_replicated_when_fewer_than_ranks():
    model, ir = _sharded("qwen2", 4)  # 4 query heads, 1 key/value head
    k = "model.layers.0.self_attn.k_proj.weight"
    full = dict(model.named_parameters())[k]
    for r in range(4):
        torch.testing.assert_close(_weight(ir, k, r), full)
    assert ir.kv.layers[0].n_kv_heads == 1
    q = next(n for n in ir.graph.nodes if n.target is torch.ops.lmforge.attention.default).args[0]
    assert q.meta["spec"].shape[1] == 1  # one query head per rank


def test_gpt2_fused_qkv_cut_per_piece():
    model, ir = _sharded("gpt2", 2)
    name = "transformer.h.0.attn.c_attn.weight"  # Conv1D: (in, 3 * hidden), q | k | v along the columns
    full = dict(model.named_parameters())[name]
    rank1 = torch.cat([full[:, 32:64], full[:, 96:128], full[:, 160:192]], dim=1)
    torch.testing.assert_close(_weight(ir, name, 1), rank1)
    split = next(n for n in ir.graph.nodes if n.target is aten.split.Tensor)
    assert split.args[1] == 32 and split.meta["tp_global"]["args"][1] == 64
    view = split.args[0]
    assert view.args[1][-1] == 96 and view.meta["tp_global"]["args"][1][-1] == 192
    # the tied table is cut once, by vocabulary rows, for the lookup and the projection alike
    emb = next(n for n in ir.graph.nodes if n.target is aten.embedding.default)
    proj = next(n for n in ir.graph.nodes if n.op == "call_function" and n.target is aten.linear.default)
    assert emb.args[0].target == proj.args[1].target and ir.weight(emb.args[0].target).shape == (66, 64)
    assert ir.weight_names[emb.args[0].target] == "lm_head.weight"
    # row-parallel c_proj: addmm -> mm, all_reduce, then the bias once
    reduce = next(n for n in ir.graph.nodes if n.target is all_reduce and n.args[0].target is aten.mm.default)
    assert next(iter(reduce.users)).target is aten.add.Tensor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_plan_is_what_the_rewrite_does(arch):
    """`plan` leaves the graph alone, and its weights, collectives and KV heads are what the pass then does."""
    from lmforge.ir.printer import format_ir

    _, whole = _optimized(arch)
    ir = copy.deepcopy(whole)
    p = plan(ir, 2)
    assert format_ir(ir) == format_ir(whole) and ir.tensor_parallel is None
    PassManager("shard{tp=2}").run(ir)
    tp = ir.tensor_parallel
    done = {ir.weight_names[attr].removesuffix(".tp"): (c.axis, c.shape, c.ranks) for attr, c in tp.weights.items()}
    planned = {w.weight: (w.cut.axis, w.cut.shape, w.cut.ranks) for w in p.weights}
    assert planned == done
    for op in ("all_reduce", "all_gather"):
        mine = [c for c in p.collectives if c.op == op]
        assert len(mine) == tp.collectives[op].count
        assert sum(c.elements_per_token for c in mine) == tp.collectives[op].elements_per_token
    caches = {n.name: n.meta["spec"].shape[1] for n in ir.graph.nodes if n.name.startswith(("k_cache", "v_cache"))}
    assert p.kv_heads == caches
    assert [r.layer for r in p.replicated] == list(tp.replicated)


def test_plan_reads_as_a_table():
    _, whole = _optimized("llama")
    text = plan(whole, 2).format()
    lines = text.splitlines()
    assert lines[0] == ("tensor-parallel plan, tp=2: 11 column-parallel, 4 row-parallel, 1 vocab-parallel and 0 "
                        "replicated layers; per step 5 all-reduces, 1 all-gather")

    def row(weight):
        return next(line.split() for line in lines if line.split()[:1] == [weight])

    q = row("model.layers.0.self_attn.q_proj.weight")
    assert q[1:6] == ["column", "0", "64x64", "[0,32)", "[32,64)"]
    assert " ".join(q[6:]) == "column-parallel: output features in whole heads of 16"
    down = row("model.layers.0.mlp.down_proj.weight")
    assert down[1:6] == ["row", "1", "64x112", "[0,56)", "[56,112)"]
    assert " ".join(down[6:]) == ("row-parallel: input features as model.layers.0.mlp.gate_proj, "
                                  "model.layers.0.mlp.up_proj cut them")
    assert row("model.embed_tokens.weight")[1:6] == ["vocab", "0", "131x64", "[0,66)", "[66,132)"]
    assert row("lm_head.weight")[6:9] == ["column-parallel:", "output", "features"]  # padded 131 -> 132, gathered
    assert any("logits gather" in line and "cut back to 131" in line for line in lines)
    assert "  %k_cache_0  kv cache  1 heads" in lines


def test_plan_of_one_rank_is_empty():
    _, whole = _optimized("llama")
    assert plan(whole, 1).layers == {} and plan(whole, 1).weights == []


def test_tp_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(PassError, match=r"tp=3 does not divide the 4 heads of 16 of model\.layers\.0\.self_attn\.q_proj"):
        _sharded("llama", 3)


def test_int4_group_straddling_ranks_is_refused():
    # o_proj has 64 input columns: two groups of 32 shard whole; one group of 64 would be cut in half
    with pytest.raises(PassError, match=r"splits the 64 input columns of model\.layers\.0\.self_attn\.o_proj into "
                                        r"32 per rank, which straddles its int4 groups of 64; group size 32 would fit"):
        _sharded("llama", 2, "scheme=int4,group_size=64,skip=")


def test_shard_twice_is_refused():
    _, ir = _sharded("llama", 2)
    with pytest.raises(PassError, match="already sharded"):
        PassManager("shard{tp=2}").run(ir)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_unshard_gives_back_the_one_device_graph(arch):
    model, whole = _optimized(arch)
    _, ir = _sharded(arch, 2)
    cuts = ir.tensor_parallel.weights
    unshard(ir, assemble(cuts, ir.tensor_parallel.rank_weights))
    ids = random_ids(2, 7)
    torch.testing.assert_close(_logits(ir, ids), _logits(whole, ids), rtol=0, atol=1e-6)
    assert not any(n.target in (all_reduce, all_gather) for n in ir.graph.nodes)
    assert [l.n_kv_heads for l in ir.kv.layers] == [l.n_kv_heads for l in whole.kv.layers]
    PassManager("shard{tp=4}").run(ir)  # and it shards again, to another tp
    with torch.no_grad():
        expected = model(ids).logits
    for got in _run_sharded(ir, ids, 4):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_unshardable_use_keeps_its_layers_replicated():
    """A column layer whose output reaches an op with no sharding rule (here a sum over its features, added to
    the residual stream) stays replicated, as do the layers that meet it; the rest is still sharded."""
    from lmforge.ir.spec import TensorSpec

    _, ir = _optimized("llama")
    ir = copy.deepcopy(ir)
    graph = ir.graph
    gate = next(n for n in graph.nodes if n.target is aten.linear.default
                and ir.weight_names[n.args[1].target] == "model.layers.0.mlp.gate_proj.weight")
    down = next(n for n in graph.nodes if n.target is aten.linear.default
                and ir.weight_names[n.args[1].target] == "model.layers.0.mlp.down_proj.weight")
    fused = next(iter(down.users))  # the residual add, joined with the next layer's norm: (normed, sum)
    residual = next(u for u in fused.users if u.args[1] == 1)
    with graph.inserting_after(residual):
        total = graph.call_function(aten.sum.dim_IntList, (gate, [-1], True))
        total.meta["spec"] = TensorSpec((*gate.meta["spec"].shape[:-1], 1), torch.float32)
    with graph.inserting_after(total):
        added = graph.call_function(aten.add.Tensor, (residual, total))
        added.meta["spec"] = residual.meta["spec"]
    residual.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
    ir.gm.recompile()
    whole = copy.deepcopy(ir)
    planned = {r.layer: r.why for r in plan(ir, 2).replicated}
    PassManager("shard{tp=2}").run(ir)
    replicated = ir.tensor_parallel.replicated
    assert planned == replicated
    assert "aten.sum.dim_IntList" in replicated["model.layers.0.mlp.gate_proj"]
    assert set(replicated) == {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert ir.history[-1]["stats"]["column-layers"] == 9  # layer 1's MLP and both attentions still shard
    ids = random_ids(2, 6)
    for got in _run_sharded(ir, ids, 2):
        torch.testing.assert_close(got, _logits(whole, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["phi3", "gemma", "gemma2", "qwen3", "gpt_neox", "opt", "falcon", "phi"])
def test_more_families_match_hf(family):
    """Fused q/k/v cut by slices (Phi-3) or by heads (GPT-NeoX), partial rotary (Phi), q/k norms (Qwen3), OPT's
    biases and Falcon's `x @ W.T` all shard; attention that fuse-attention leaves unfused (Gemma 2's
    softcapping) and Falcon's multi-query q/k/v, sliced by heads, stay replicated, with the reason."""
    from tests.ir.test_capture_archs import build_family

    model = build_family(family)
    ir = capture(model)
    PassManager(default_pipeline(None, 64) + parse_pipeline("shard{tp=2}")).run(ir)
    ids = random_ids(1, 6)
    with torch.no_grad():
        expected = model(ids).logits
    for got in _run_sharded(ir, ids, 2):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    replicated = ir.tensor_parallel.replicated
    assert bool(replicated) == (family in ("gemma2", "falcon")), replicated
    assert ir.history[-1]["stats"]["row-layers"] >= 2
