"""fuse-glu: each gated MLP's act(gate) * up becomes one lmforge.glu, in float32 and after convert-dtype, for
SwiGLU (Llama, Qwen2, Mistral; Phi-3's split gate_up, with the product's operands the other way round) and
GeGLU (Gemma's gelu_pytorch_tanh), and still matches Hugging Face eager through the cache, on one device and
sharded; GPT-2's plain MLP and the near-misses are left alone, the latter counted with the reason."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

import lmforge.codegen.glu  # noqa: F401  (the op)
import lmforge.passes.fuse_glu  # noqa: F401  (the pass)
from lmforge.codegen.glu import glu
from lmforge.ir.capture import capture
from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.ops import bound_op
from lmforge.ir.printer import format_ir
from lmforge.ir.spec import spec_from_value
from lmforge.passes import PassManager, default_pipeline
from lmforge.ir.match import evaluate
from tests.conftest import make_model, random_ids, run_ranks
from tests.ir.test_capture import assert_matches_hf, run_chunks
from tests.ir.test_capture_archs import build_family

aten = torch.ops.aten
_captured: dict[str, tuple] = {}


def _model_and_ir(arch: str):
    """(HF model, a fresh copy of its captured graph); each architecture is captured once."""
    if arch not in _captured:
        model = build_family(arch) if arch in ("gemma", "phi3") else make_model(arch)
        _captured[arch] = (model, capture(model))
    model, ir = _captured[arch]
    return model, copy.deepcopy(ir)


def pipeline(dtype: str, glu_at: str | None = "fuse-rotary") -> str:
    """The default pipeline with fuse-glu right after the step `glu_at` (beside fuse-rotary, where it belongs), or
    without fuse-glu (None), whether or not the default pipeline has it."""
    steps = [str(s) for s in default_pipeline(None if dtype == "float32" else dtype, 64) if s.name != "fuse-glu"]
    if glu_at is not None:
        at = next(i for i, s in enumerate(steps) if s.split("{")[0] == glu_at)
        steps.insert(at + 1, "fuse-glu")
    return ",".join(steps)


def count(ir, target) -> int:
    return sum(1 for n in ir.graph.nodes if n.target is target)


def stats(ir) -> dict:
    return next(h["stats"] for h in ir.history if h["pass"] == "fuse-glu")


def layers(model) -> int:
    return model.config.num_hidden_layers


def _source(ir, node) -> str:
    """The weight name of the linear layer whose output `node` is, through a split's getitem."""
    while node.target is not aten.linear.default:
        node = node.args[0]
    return ir.weight_names[node.args[1].target]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_swiglu_fused_and_matches_hf(arch, dtype):
    model, ir = _model_and_ir(arch)
    PassManager(pipeline(dtype)).run(ir)
    n = layers(model)
    assert stats(ir) == {"fused": n, "fused: silu": n}
    assert count(ir, glu) == n and count(ir, aten.silu.default) == 0
    for i, node in enumerate(n for n in ir.graph.nodes if n.target is glu):
        gate, up, act = node.args
        assert act == "silu" and node.meta["spec"].dtype == getattr(torch, dtype)
        assert _source(ir, gate) == f"model.layers.{i}.mlp.gate_proj.weight"
        assert _source(ir, up) == f"model.layers.{i}.mlp.up_proj.weight"
        (down,) = node.users
        assert ir.weight_names[down.args[1].target] == f"model.layers.{i}.mlp.down_proj.weight"
    assert_matches_hf(ir, model, random_ids(2, 10), [6, 1, 3], dtype)


def test_bfloat16_fused_equals_unfused():
    """In bfloat16 the op keeps PyTorch's two roundings (act(gate), then the product): the fused graph gives
    what the unfused one gives, far inside the tolerance against HF."""
    model, fused = _model_and_ir("llama")
    unfused = copy.deepcopy(fused)
    PassManager(pipeline("bfloat16")).run(fused)
    PassManager(pipeline("bfloat16", glu_at=None)).run(unfused)
    ids = random_ids(2, 10)
    want = run_chunks(unfused, ids, [6, 1, 3]).float()
    got = run_chunks(fused, ids, [6, 1, 3]).float()  # decode steps and the 6-token prefill run the CPU kernel
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()


def test_gpt2_has_no_gated_mlp():
    # GPT-2's MLP is c_proj(gelu_new(c_fc(x))): no product of an activation with another projection
    model, ir = _model_and_ir("gpt2")
    PassManager(pipeline("float32", glu_at=None)).run(ir)
    before = format_ir(ir)
    PassManager("fuse-glu").run(ir)
    assert stats(ir) == {"fused": 0} and ir.history[-1]["changed"] is False
    assert format_ir(ir) == before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma_geglu(dtype):
    model, ir = _model_and_ir("gemma")
    assert model.config.hidden_act == "gelu_pytorch_tanh"
    PassManager(pipeline(dtype)).run(ir)
    n = layers(model)
    assert stats(ir) == {"fused": n, "fused: gelu_tanh": n}
    assert {node.args[2] for node in ir.graph.nodes if node.target is glu} == {"gelu_tanh"}
    assert count(ir, aten.gelu.default) == 0
    assert_matches_hf(ir, model, random_ids(1, 8), [5, 1, 2], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_phi3_split_gate_up_either_order(dtype):
    # Phi-3: gate, up = gate_up_proj(x).chunk(2); up * silu(gate): the product's operands the other way round,
    # gate and up two strided halves of one tensor (which the CPU kernel reads in place, in bfloat16)
    model, ir = _model_and_ir("phi3")
    PassManager(pipeline(dtype)).run(ir)
    n = layers(model)
    assert stats(ir) == {"fused": n, "fused: silu": n}
    for node in ir.graph.nodes:
        if node.target is glu:
            gate, up, _ = node.args
            assert (gate.args[1], up.args[1]) == (0, 1) and gate.args[0] is up.args[0]  # getitem 0 and 1 of a split
    assert_matches_hf(ir, model, random_ids(1, 8), [5, 1, 2], dtype)


def test_before_convert_dtype_too():
    """Fused on the float32 graph, then converted: the op declares its casts (up in gate's dtype), and since both
    come from linear layers in the weights' dtype, convert-dtype adds none."""
    model, ir = _model_and_ir("llama")
    PassManager(pipeline("bfloat16", glu_at="fuse-attention")).run(ir)
    convert = next(h["stats"] for h in ir.history if h["pass"].startswith("convert-dtype"))
    assert "cast-glu-input" not in convert
    assert stats(ir)["fused"] == layers(model)
    assert all(n.args[0].meta["spec"].dtype == torch.bfloat16 for n in ir.graph.nodes if n.target is glu)
    assert_matches_hf(ir, model, random_ids(2, 10), [6, 1, 3], "bfloat16")


def test_sharded_after_fuse_glu_matches_hf():
    """shard{tp=2} carries glu through as elementwise: gate and up are column-parallel (56 of 112 features a rank),
    so each rank gates its own slice, and down_proj is row-parallel on it."""
    from lmforge.passes.shard import for_rank

    model, ir = _model_and_ir("llama")
    PassManager(pipeline("float32") + ",shard{tp=2}").run(ir)
    assert stats(ir)["fused"] == layers(model) and ir.tensor_parallel.replicated == {}
    for node in ir.graph.nodes:
        if node.target is glu:
            assert node.meta["spec"].shape[-1] == model.config.intermediate_size // 2
    shard = next(h["stats"] for h in ir.history if h["pass"].startswith("shard"))
    assert shard["row-layers"] == 2 * layers(model)  # o_proj and down_proj
    ids = random_ids(2, 9)
    with torch.no_grad():
        expected = model(ids).logits

    def logits(rank: int) -> torch.Tensor:
        part = for_rank(ir, rank)
        caches = [torch.zeros(2, l.n_kv_heads, 9, d) for l in part.kv.layers for d in (l.k_head_dim, l.v_head_dim)]
        return part.gm(ids, torch.arange(9).expand(2, 9), torch.ones_like(ids), *caches)[0]

    for got in run_ranks(logits, 2):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_artifact_with_glu_loads_and_runs(tmp_path):
    """graph.json names the op `lmforge.glu.default`; loading resolves it (the op module is imported) and the
    engine, binding it to its CPU implementation, matches HF eager."""
    import lmforge

    model, _ = _model_and_ir("llama")
    art = lmforge.optimize(model, tmp_path / "art", dtype="bfloat16", max_seq_len=64, pipeline=pipeline("bfloat16"))
    assert "lmforge.glu.default" in (art.path / "graph.json").read_text()
    engine = lmforge.load(art.path)
    bound = [n for n in engine.ir.graph.nodes if n.op == "call_function" and bound_op(n.target) is glu]
    assert len(bound) == layers(model)  # bound to the CPU implementation, which picks the kernel per call
    ids = random_ids(1, 7)
    with torch.no_grad():
        want = model(ids).logits.float()
    got = engine(ids).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


# --- hand-built graphs: what must not fuse, and each act -------------------------------------------------

BF16 = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
F32 = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))


class _Annotate(fx.Interpreter):
    def run_node(self, n):  # every node gets the meta["spec"] of its value, as capture gives it
        value = super().run_node(n)
        n.meta["spec"] = spec_from_value(value)
        return value


def _ir(fn, *example) -> GraphIR:
    """`fn(x0, x1, ...)` (ATen calls) traced into a subgraph-kind GraphIR, specs from a run on `example`."""
    names = ", ".join(f"x{i}" for i in range(len(example)))
    scope = {"fn": fn}
    exec(f"def forward(self, {names}):\n    return fn({names})\n", scope)
    gm = fx.symbolic_trace(type("Traced", (torch.nn.Module,), {"forward": scope["forward"]})())
    _Annotate(gm).run(*example)
    return GraphIR(gm=gm, config={}, kv=KVCacheSpec([], torch.float32), weight_names={}, kind="subgraph")


def _output(ir, *example):
    out = next(n for n in ir.graph.nodes if n.op == "output").args[0]
    return evaluate(ir, out, {f"x{i}": t for i, t in enumerate(example)})


@pytest.mark.parametrize("fn, act", [
    (lambda g, u: aten.mul.Tensor(aten.silu.default(g), u), "silu"),
    (lambda g, u: aten.mul.Tensor(u, aten.silu.default(g)), "silu"),  # either order
    (lambda g, u: aten.mul.Tensor(aten.gelu.default(g), u), "gelu"),
    (lambda g, u: aten.mul.Tensor(aten.gelu.default(g, approximate="none"), u), "gelu"),
    (lambda g, u: aten.mul.Tensor(aten.gelu.default(g, approximate="tanh"), u), "gelu_tanh"),
])
def test_each_act_and_order(fn, act):
    ir = _ir(fn, BF16, BF16.flip(0))
    want = _output(ir, BF16, BF16.flip(0))
    PassManager("fuse-glu").run(ir)
    assert stats(ir) == {"fused": 1, f"fused: {act}": 1}
    (node,) = [n for n in ir.graph.nodes if n.op == "call_function"]
    assert node.target is glu and node.args == (*[p for p in ir.graph.nodes if p.op == "placeholder"], act)
    assert torch.equal(_output(ir, BF16, BF16.flip(0)), want)


def _shared(g, u):
    a = aten.silu.default(g)
    return aten.mul.Tensor(a, u), aten.neg.default(a)


def _squared(g):
    a = aten.silu.default(g)
    return aten.mul.Tensor(a, a)


@pytest.mark.parametrize("fn, example, reason", [
    # act(gate) is needed elsewhere as well: fusing would have to keep it anyway
    (_shared, (BF16, BF16), "the activation has other users"),
    # act(gate) rounded to another dtype before the product: the op has no cast there
    (lambda g, u: aten.mul.Tensor(aten._to_copy.default(aten.silu.default(g), dtype=torch.float32), u),
     (BF16, F32), "a cast between the activation and the product"),
    # the product would promote to float32; the op runs in one dtype
    (lambda g, u: aten.mul.Tensor(aten.silu.default(g), u), (BF16, F32), "gate and up differ in dtype"),
    # a broadcast product (a per-feature scale, not an up projection)
    (lambda g, u: aten.mul.Tensor(aten.silu.default(g), u), (BF16, BF16[0]), "gate and up differ in shape"),
    (lambda g: aten.mul.Tensor(aten.silu.default(g), 2.0), (BF16,), "the activation times a number"),
    (_squared, (BF16,), "the activation times itself"),
])
def test_near_misses_are_left_alone_with_the_reason(fn, example, reason):
    ir = _ir(fn, *example)
    before = format_ir(ir)
    PassManager("fuse-glu").run(ir)
    unfused = {k: v for k, v in stats(ir).items() if k.startswith("unfused")}
    assert stats(ir)["fused"] == 0 and set(unfused) == {f"unfused: {reason}"}
    assert format_ir(ir) == before


def test_plain_activation_is_not_counted():
    # an activation that feeds no product is no gated MLP (GPT-NeoX, Falcon): nothing to say about it
    ir = _ir(lambda g: aten.neg.default(aten.gelu.default(g)), BF16)
    PassManager("fuse-glu").run(ir)
    assert stats(ir) == {"fused": 0}


class _GateFromWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(5, 5, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):  # gate from a linear layer, up from the input itself
        return glu(aten.linear.default(x, self.w), aten.mul.Tensor(x, 2.0), "silu")


def test_convert_dtype_casts_up_to_gates_dtype():
    # convert-dtype runs the linear layer, so gate, in bfloat16 but leaves up in float32; the op's casts (up in
    # gate's dtype) put it in bfloat16 too, and the verifier's one-dtype rule holds after the pass
    gm = fx.symbolic_trace(_GateFromWeight())
    _Annotate(gm).run(F32)
    ir = GraphIR(gm=gm, config={}, kv=KVCacheSpec([], torch.float32), weight_names={"w": "w"}, kind="subgraph")
    PassManager("convert-dtype{dtype=bfloat16}").run(ir)
    assert ir.history[-1]["stats"]["cast-glu-input"] == 1
    (node,) = [n for n in ir.graph.nodes if n.target is glu]
    assert node.args[1].target is aten._to_copy.default and node.args[1].kwargs == {"dtype": torch.bfloat16}
    assert node.meta["spec"].dtype == torch.bfloat16
