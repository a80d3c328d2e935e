"""Dtype inference (`ir/infer.py`): symbolic sizes evaluated, the graph run on meta tensors, and stale spec
dtypes refreshed after a rewrite, with symbolic shapes kept."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from lmforge.ir.capture import capture
from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.infer import EXAMPLE_SIZES, eval_dim, meta_run, refresh_dtypes
from lmforge.ir.spec import TensorSpec
from tests.conftest import VOCAB, make_model

aten = torch.ops.aten


# --- symbolic sizes ----------------------------------------------------------------------------------


def test_example_sizes_are_small_and_distinct():
    assert EXAMPLE_SIZES == {"batch": 2, "seq": 3, "kv_len": 5}  # kv_len >= seq, as the convention needs


@pytest.mark.parametrize("dim, value", [
    (7, 7),
    ("batch", 2),
    ("kv_len - seq", 2),
    ("2 * batch + 1", 5),
    ("kv_len // seq", 1),
    ("kv_len % seq", 2),
    ("-seq", -3),
    ("(kv_len - seq) * (batch + 4)", 12),
])
def test_eval_dim_at_the_example_sizes(dim, value):
    assert eval_dim(dim) == value


def test_eval_dim_with_other_sizes():
    assert eval_dim("kv_len - seq", {"kv_len": 100, "seq": 1}) == 99
    assert eval_dim(4, {}) == 4


@pytest.mark.parametrize("dim", ["batch ** 2", "batch / 2", "1.5", "max(batch, seq)", "heads", "__import__('os')",
                                 "batch if seq else 1"])
def test_eval_dim_refuses_anything_else(dim):
    """Names, integers and + - * // % only: a size is never evaluated as Python."""
    with pytest.raises(ValueError, match="unsupported symbolic size"):
        eval_dim(dim)


# --- meta runs of a captured model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_ir() -> GraphIR:
    return capture(make_model("llama"))


def _concrete(spec: TensorSpec) -> tuple[int, ...]:
    return tuple(eval_dim(d) for d in spec.shape)


def test_meta_run_agrees_with_every_captured_spec(llama_ir):
    values = meta_run(llama_ir)
    tensors = 0
    for node in llama_ir.graph.nodes:
        spec = node.meta.get("spec")
        if not isinstance(spec, TensorSpec):
            continue
        value = values[node]
        assert value.device.type == "meta", node.name
        assert (tuple(value.shape), value.dtype) == (_concrete(spec), spec.dtype), f"%{node.name}: {spec}"
        tensors += 1
    assert tensors > 50
    by_name = {n.name: n for n in llama_ir.graph.nodes}
    assert values[by_name["input_ids"]].shape == (2, 3) and values[by_name["k_cache_1"]].shape == (2, 2, 5, 16)
    out = next(n for n in llama_ir.graph.nodes if n.op == "output")
    assert values[out.args[0][0]].shape == (2, 3, VOCAB)


def test_before_hook_sees_every_call_before_it_runs(llama_ir):
    seen: list[str] = []

    def before(node, env):
        assert all(a in env for a in node.all_input_nodes)  # its inputs have run, it has not
        assert node not in env
        seen.append(node.name)

    meta_run(llama_ir, before=before)
    assert seen == [n.name for n in llama_ir.graph.nodes if n.op == "call_function"]


# --- refreshing dtypes -------------------------------------------------------------------------------


def _graph(build) -> GraphIR:
    """A small subgraph-kind GraphIR; build(g, spec) adds nodes and returns the outputs."""
    g = fx.Graph()

    def spec(node, *shape, dtype=torch.float32):
        node.meta["spec"] = TensorSpec(tuple(shape), dtype)
        return node

    g.output(tuple(build(g, spec)))
    return GraphIR(gm=fx.GraphModule(torch.nn.Module(), g), config={}, kv=KVCacheSpec([], torch.float32),
                   weight_names={}, kind="subgraph")


def test_refresh_dtypes_updates_stale_specs_and_keeps_symbolic_shapes():
    def build(g, spec):
        x = spec(g.placeholder("x"), "batch", "seq")
        # a rewrite turned the graph to bfloat16 and left the specs saying float32
        half = spec(g.call_function(aten._to_copy.default, (x,), {"dtype": torch.bfloat16}), "batch", "seq")
        total = spec(g.call_function(aten.sum.dim_IntList, (half, [1])), "batch")
        ids = spec(g.call_function(aten.argmax.default, (half, 1)), "batch", dtype=torch.float32)  # really int64
        return [total, ids]

    ir = _graph(build)
    assert refresh_dtypes(ir) == 3
    specs = [n.meta["spec"] for n in ir.graph.nodes if n.op != "output"]
    assert specs == [TensorSpec(("batch", "seq"), torch.float32),  # inputs are what they are
                     TensorSpec(("batch", "seq"), torch.bfloat16),
                     TensorSpec(("batch",), torch.bfloat16),
                     TensorSpec(("batch",), torch.int64)]
    assert refresh_dtypes(ir) == 0  # nothing left to change


def test_views_of_non_contiguous_values_still_infer():
    """Meta kernels do not always reproduce the real strides, so a view the real run accepts may not fit the
    meta value: inference runs it as a reshape."""
    def build(g, spec):
        x = spec(g.placeholder("x"), "batch", 4)
        xt = spec(g.call_function(aten.t.default, (x,)), 4, "batch")
        flat = spec(g.call_function(aten.view.default, (xt, [-1])), "4 * batch")
        return [flat]

    ir = _graph(build)
    values = meta_run(ir)
    flat = next(n for n in ir.graph.nodes if n.op == "call_function" and n.target is aten.view.default)
    assert values[flat].shape == (8,)  # the graph itself keeps its view


def test_device_arguments_are_moved_to_meta():
    def build(g, spec):
        return [spec(g.call_function(aten.ones.default, ([2, 3],), {"device": torch.device("cpu"), "dtype": torch.float16}), 2, 3)]

    ir = _graph(build)
    (value,) = [v for n, v in meta_run(ir).items() if n.op == "call_function"]
    assert value.device.type == "meta" and value.dtype == torch.float16
    assert refresh_dtypes(ir) == 1


def test_a_node_that_cannot_run_is_named():
    def build(g, spec):
        x = spec(g.placeholder("x"), "batch", 4)
        y = spec(g.placeholder("y"), 5, 6)
        return [spec(g.call_function(aten.mm.default, (x, y)), "batch", 6)]

    ir = _graph(build)
    mm = next(n for n in ir.graph.nodes if n.op == "call_function")
    with pytest.raises(RuntimeError, match=rf"^%{mm.name} \(aten.mm.default\) fails on meta inputs: \S"):
        refresh_dtypes(ir)
