"""cse: equal values computed once. Per-layer rotary work merges on real architectures with Hugging Face
eager's logits unchanged (prefill and decode, one device and tp=2); random ops, cache writes, 1 vs 1.0 and
reads on either side of a cache write never merge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

from lmforge.passes.cse import cse  # registers the pass
from lmforge.codegen.attention import attention, attention_impl
from lmforge.ir.capture import capture
from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.pass_manager import NoOptions
from lmforge.ir.printer import format_ir
from lmforge.ir.spec import SymSpec, TensorSpec, spec_from_tensor
from lmforge.ir.verify import verify
from lmforge.passes import PassManager, default_pipeline
from lmforge.passes.shard import assemble, for_rank, unshard
from tests.conftest import make_model, random_ids, run_ranks
from tests.ir.test_capture import assert_matches_hf, run_chunks
from tests.passes.test_shard import _logits, _optimized

aten = torch.ops.aten
ROTARY = torch.ops.lmforge.rotary.default


def _pipeline(dtype: str) -> str:
    convert = f"convert-dtype{{dtype={dtype}}}," if dtype != "float32" else ""
    return f"remove-noops,dce,fuse-attention,{convert}fuse-rmsnorm,fuse-rotary,constant-fold{{max_positions=64}}"


def _stats(ir, name: str = "cse") -> dict[str, int]:
    return [h["stats"] for h in ir.history if h["pass"] == name][-1]


def _count(ir, target) -> int:
    return sum(1 for n in ir.graph.nodes if n.target is target)


def _layers(model) -> int:
    config = model.config
    return getattr(config, "num_hidden_layers", None) or config.n_layer


def _expected(arch: str, layers: int, dtype: str) -> dict[str, int]:
    """What each layer after the first recomputes: the unsqueeze of the cos and of the sin rows (rotary archs),
    and in a half dtype their casts to it. GPT-2 has learned positions and nothing per layer to share."""
    if arch == "gpt2":
        return {"merged": 0}
    repeats = {"aten.unsqueeze.default": 2 * (layers - 1)}
    if dtype != "float32":
        repeats["aten._to_copy.default"] = 2 * (layers - 1)
    return {"merged": sum(repeats.values()), **repeats}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_per_layer_rotary_work_merges_and_matches_hf(arch, hf_model, dtype):
    ir = capture(hf_model)
    PassManager(_pipeline(dtype)).run(ir)
    layers = _layers(hf_model)
    unsqueezes = _count(ir, aten.unsqueeze.default)
    PassManager("cse,dce").run(ir)
    assert _stats(ir) == _expected(arch, layers, dtype)
    assert _stats(ir, "dce")["nodes_removed"] == 0  # cse erases what it merges and leaves nothing dead
    if arch != "gpt2":  # one cos and one sin (cast once) now serve every layer's two rotations
        assert unsqueezes == 2 * layers and _count(ir, aten.unsqueeze.default) == 2
        tables = {n.args[1:] for n in ir.graph.nodes if n.target is ROTARY}
        assert len(tables) == 1 and _count(ir, ROTARY) == 2 * layers
        assert all(t.meta["spec"].dtype == getattr(torch, dtype) for t in next(iter(tables)))
    verify(ir)
    ids = random_ids(2, 10)
    assert_matches_hf(ir, hf_model, ids, [6, 1, 3], dtype)
    assert_matches_hf(ir, hf_model, ids, [1] * 4 + [2, 4], dtype)
    text = format_ir(ir)
    PassManager("cse").run(ir)  # idempotent
    assert ir.history[-1]["changed"] is False and _stats(ir) == {"merged": 0} and format_ir(ir) == text


def test_captured_graph_with_index_copy_writes():
    """cse is legal right after capture too, where the cache writes are still `index_copy_` and the attention
    reads the caches after them; only what no write can affect merges, and the logits stay HF's."""
    model = make_model("llama")
    ir = capture(model)
    layers = _layers(model)
    # the writes, and what reads the caches after them (repeat_kv's unsqueeze, expand and clone)
    readers = (aten.index_copy_.default, aten.expand.default, aten.clone.default)
    before = [_count(ir, op) for op in readers]
    PassManager("cse").run(ir)
    assert [_count(ir, op) for op in readers] == before and before[0] == 2 * layers
    assert _stats(ir)["aten.unsqueeze.default"] == 2 * (layers - 1)  # each layer's cos/sin unsqueeze
    verify(ir)
    assert_matches_hf(ir, model, random_ids(1, 7), [4, 1, 2])


# --- after shard ------------------------------------------------------------------------------------------


def _without_cse():
    return [step for step in default_pipeline(None, 64) if step.name != "cse"]


def test_after_shard_llama_matches_hf():
    model = make_model("llama")
    ir = capture(model)
    PassManager(_without_cse() + PassManager("shard{tp=2},cse,dce").steps).run(ir)
    assert _stats(ir) == _expected("llama", _layers(model), "float32")
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = model(ids).logits
    for chunks in ([9], [5, 1, 3]):  # prefill, then decode steps, through each rank's cache
        for got in run_ranks(lambda r: run_chunks(for_rank(ir, r), ids, chunks), 2):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_before_shard_llama_matches_hf():
    model = make_model("llama")
    ir = capture(model)
    PassManager(_without_cse()[:-1] + PassManager("cse,shard{tp=2},dce").steps).run(ir)
    assert _stats(ir)["merged"] == 2 * (_layers(model) - 1)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    for got in run_ranks(lambda r: run_chunks(for_rank(ir, r), ids, [4, 1, 2]), 2):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_after_shard_gpt2_merged_table_read_unshards():
    """Sharding GPT-2 reads its tied, vocabulary-cut table through two get_attr nodes (the lookup's and the
    projection's); cse merges them, and the one-device args shard recorded must then name the survivor, or
    `unshard` (resharding an artifact to another tp) would rebuild a graph reading an erased node."""
    model, whole = _optimized("gpt2")
    ir = copy.deepcopy(whole)
    PassManager("shard{tp=2},cse,dce").run(ir)
    assert _stats(ir) == {"merged": 1, "get_attr": 1}
    nodes = set(ir.graph.nodes)
    for node in ir.graph.nodes:
        for ref in node.meta.get("tp_global", {}).get("args", ()):
            assert not isinstance(ref, fx.Node) or ref in nodes, (node, ref)
    ids = random_ids(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
    for got in run_ranks(lambda r: _logits(for_rank(ir, r), ids), 2):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    unshard(ir, assemble(ir.tensor_parallel.weights, ir.tensor_parallel.rank_weights))
    verify(ir)
    torch.testing.assert_close(_logits(ir, ids), _logits(whole, ids), rtol=0, atol=1e-6)


# --- hand-built graphs ------------------------------------------------------------------------------------


def _ir(build, *inputs: torch.Tensor, weights: dict[str, torch.Tensor] | None = None,
        names: list[str] | None = None) -> GraphIR:
    """A subgraph-kind GraphIR of what `build(graph, *placeholders)` adds (it returns the outputs), its specs
    taken from a run on `inputs`."""
    root = torch.nn.Module()
    for name, w in (weights or {}).items():
        root.register_buffer(name, w)
    graph = fx.Graph()
    xs = [graph.placeholder(name) for name in names or [f"x{i}" for i in range(len(inputs))]]
    graph.output(tuple(build(graph, *xs)))
    gm = fx.GraphModule(root, graph)

    class Record(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n.op != "output":
                n.meta["spec"] = (spec_from_tensor(value) if isinstance(value, torch.Tensor)
                                  else SymSpec(str(value)) if isinstance(value, int) else None)
            return value

    Record(gm).run(*[t.clone() for t in inputs])
    return GraphIR(gm, {}, KVCacheSpec([], torch.float32), {n: n for n in weights or {}}, kind="subgraph")


def _run(ir, inputs):
    torch.manual_seed(0)
    with torch.no_grad():
        return ir.gm(*[t.clone() for t in inputs])


def _cse(ir, inputs) -> dict[str, int]:
    """Run cse, checking the graph verifies and computes what it did before."""
    before = _run(ir, inputs)
    PassManager("cse").run(ir)
    after = _run(ir, inputs)
    verify(ir)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return _stats(ir)


def call(g, target, *args, **kwargs):
    return g.call_function(target, args, kwargs)


def test_equal_calls_lists_and_weights_merge():
    def build(g, x):
        w1, w2 = g.get_attr("w"), g.get_attr("w")
        a = call(g, aten.mul.Tensor, x, w1)
        b = call(g, aten.mul.Tensor, x, w2)  # same once w2 is w1
        v1, v2 = call(g, aten.view.default, a, [2, -1]), call(g, aten.view.default, b, [2, -1])  # lists elementwise
        c1 = call(g, aten._to_copy.default, v1, dtype=torch.bfloat16)
        c2 = call(g, aten._to_copy.default, v2, dtype=torch.bfloat16)
        return [call(g, aten.add.Tensor, c1, c2)]

    inputs = [torch.randn(4, 6)]
    ir = _ir(build, *inputs, weights={"w": torch.randn(6)})
    assert _cse(ir, inputs) == {"merged": 4, "get_attr": 1, "aten.mul.Tensor": 1, "aten.view.default": 1,
                                "aten._to_copy.default": 1}
    add = next(n for n in ir.graph.nodes if n.target is aten.add.Tensor)
    assert add.args[0] is add.args[1]


def test_scalars_compare_by_type_and_value():
    # 1, 1.0 and True are different arguments (int, float and bool promote differently: x + True on an int
    # tensor stays int, x + 1.0 becomes float); 0.0 and -0.0 differ on a -0.0 input. Only the repeat merges.
    def build(g, x):
        return [call(g, aten.add.Tensor, x, s) for s in (1, 1.0, True, 1, 0.0, -0.0)]

    inputs = [torch.tensor([-0.0, 1.0, 2.0])]
    ir = _ir(build, *inputs)
    assert _cse(ir, inputs) == {"merged": 1, "aten.add.Tensor": 1}
    scalars = [repr(n.args[1]) for n in ir.graph.nodes if n.target is aten.add.Tensor]
    assert scalars == ["1", "1.0", "True", "0.0", "-0.0"]


def test_random_ops_are_not_merged():
    # two draws are two different values, even with equal arguments; the relu pair shows the pass ran
    def build(g, x):
        draws = [call(g, aten.rand_like.default, x), call(g, aten.rand_like.default, x),
                 call(g, aten.dropout.default, x, 0.5, True), call(g, aten.dropout.default, x, 0.5, True)]
        return draws + [call(g, aten.relu.default, x), call(g, aten.relu.default, x)]

    inputs = [torch.randn(64)]
    ir = _ir(build, *inputs)
    assert _cse(ir, inputs) == {"merged": 1, "aten.relu.default": 1}
    assert _count(ir, aten.rand_like.default) == 2 and _count(ir, aten.dropout.default) == 2
    a, b = _run(ir, inputs)[:2]
    assert not torch.equal(a, b)


def _cache_inputs():
    cache = torch.zeros(1, 2, 6, 4)
    idx = torch.tensor([4, 5])
    new = torch.randn(1, 2, 2, 4)
    return [cache, idx, new]


def test_cache_writes_are_not_merged():
    # each write is a side effect (the engine's cache changes), not a value: two stay two
    def build(g, cache, idx, new):
        w1 = call(g, aten.index_copy_.default, cache, 2, idx, new)
        w2 = call(g, aten.index_copy_.default, cache, 2, idx, new)
        return [call(g, aten.clone.default, w1), call(g, aten.clone.default, w2)]

    inputs = _cache_inputs()
    ir = _ir(build, *inputs)
    assert _cse(ir, inputs) == {"merged": 0}
    assert _count(ir, aten.index_copy_.default) == 2 and _count(ir, aten.clone.default) == 2


@pytest.mark.parametrize("target", [attention, attention_impl], ids=["op", "bound-cpu-impl"])
def test_attention_cache_writers_are_not_merged(target):
    """lmforge.attention writes its caches (OpFacts.cache_writer), also once the runtime bound the node to its
    CPU implementation, a plain Python function; equal calls stay, and so do their readers."""
    def build(g, q, k_cache, v_cache, mask):
        outs = [call(g, target, q, q, q, k_cache, v_cache, mask, 0.5, True, 0) for _ in range(2)]
        return [call(g, aten.neg.default, o) for o in outs]

    inputs = [torch.randn(1, 2, 1, 4), torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4),
              torch.ones(1, 3, dtype=torch.long)]
    ir = _ir(build, *inputs, names=["q", "k_cache_0", "v_cache_0", "attention_mask"])
    assert _cse(ir, inputs) == {"merged": 0}
    assert _count(ir, target) == 2


def test_reads_on_either_side_of_a_write_are_not_merged():
    """A read of the cache before its write and an equal read after it see different data; so do reads of one
    view of it (an alias). Sizes cannot change under a cache write: those reads merge. The values computed
    from the reads are fresh tensors, not aliases: equal ones merge."""
    def build(g, cache, idx, new):
        view = call(g, aten.slice.Tensor, cache, 2, 0, 6)
        before = [call(g, aten.mul.Tensor, cache, 2.0), call(g, aten.mul.Tensor, view, 2.0),
                  call(g, aten.sym_size.int, cache, 2)]
        fresh = [call(g, aten.neg.default, before[0]), call(g, aten.neg.default, before[0])]
        call(g, aten.index_copy_.default, cache, 2, idx, new)
        after = [call(g, aten.mul.Tensor, cache, 2.0), call(g, aten.mul.Tensor, view, 2.0),
                 call(g, aten.sym_size.int, cache, 2)]
        sizes = call(g, aten.new_zeros.default, new, [before[2], after[2]])
        return before[:2] + after[:2] + fresh + [sizes]

    inputs = _cache_inputs()
    ir = _ir(build, *inputs)
    assert _cse(ir, inputs) == {"merged": 2, "aten.sym_size.int": 1, "aten.neg.default": 1}
    assert _count(ir, aten.mul.Tensor) == 4
    out = _run(ir, inputs)
    assert not torch.equal(out[0], out[2]) and not torch.equal(out[1], out[3])


def test_size_reads_stay_apart_when_a_write_could_resize():
    # an in-place op that is no cache write (resize_) may change sizes: size reads of what it touches stay apart
    # (the verifier refuses a resize, so the pass is called directly)
    def build(g, x):
        s1 = call(g, aten.sym_size.int, x, 0)
        call(g, aten.resize_.default, x, [3])
        s2 = call(g, aten.sym_size.int, x, 0)
        return [call(g, aten.new_zeros.default, x, [s1, s2])]

    inputs = [torch.zeros(5)]
    ir = _ir(build, *inputs)
    for n in ir.graph.nodes:  # symbolic, as a captured graph's would be: the specs do not tell them apart
        if n.target is aten.sym_size.int:
            n.meta["spec"] = SymSpec("s0")
    assert cse(ir, NoOptions()).stats == {"merged": 0} and _count(ir, aten.sym_size.int) == 2


def test_different_specs_are_not_merged():
    # equal calls whose recorded specs disagree: the pass cannot tell which is right, so it keeps both
    def build(g, x):
        return [call(g, aten.neg.default, x), call(g, aten.neg.default, x)]

    inputs = [torch.randn(3)]
    ir = _ir(build, *inputs)
    second = [n for n in ir.graph.nodes if n.target is aten.neg.default][1]
    second.meta["spec"] = TensorSpec(("n",), torch.float32)
    PassManager("cse").run(ir)
    assert _stats(ir) == {"merged": 0}


def test_nodes_shard_changed_differently_are_not_merged():
    """After shard, a node's one-device args (`meta["tp_global"]`) are part of what it is: two nodes equal on
    this rank but not on one device stay apart, or `unshard` would lose one of them."""
    def build(g, x):
        return [call(g, aten.view.default, x, [2, -1]), call(g, aten.view.default, x, [2, -1])]

    inputs = [torch.randn(4, 6)]
    ir = _ir(build, *inputs)
    x, first, second = [n for n in ir.graph.nodes if n.op != "output"]
    first.meta["tp_global"] = {"args": (x, [2, -1]), "kwargs": {}, "spec": first.meta["spec"]}
    second.meta["tp_global"] = {"args": (x, [4, -1]), "kwargs": {}, "spec": TensorSpec((4, 6), torch.float32)}
    assert _cse(ir, inputs) == {"merged": 0}
    second.meta["tp_global"] = copy.copy(first.meta["tp_global"])
    assert _cse(ir, inputs) == {"merged": 1, "aten.view.default": 1}
