"""The static cost model (`ir/analysis.py`): FLOPs per token of the tiny models, counted by hand from their
configs, the same whatever form the linear layers and attention take in the graph (captured, fused, re-laid
out at load, quantized), and nothing counted that is not a weight matmul or attention."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import lmforge
from lmforge.ir.analysis import Cost, cost
from lmforge.ir.capture import capture
from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.spec import TensorSpec
from tests.conftest import make_model

aten = torch.ops.aten


def llama_like_flops(cfg) -> tuple[int, int]:
    """(matmul FLOPs per token, attention FLOPs per context token) of a Llama/Qwen2/Mistral config: per layer
    q and o are (hidden, hidden), k and v (hidden, n_kv_heads * head_dim), gate, up and down (hidden,
    intermediate); then lm_head (vocab, hidden). 2 FLOPs per weight; attention 4 * n_heads * head_dim per layer
    (q.k and p.v). The embedding is a lookup, not a matmul."""
    h, i, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i
    return 2 * (layers * per_layer + vocab * h), layers * 4 * cfg.num_attention_heads * head_dim


def gpt2_flops(cfg) -> tuple[int, int]:
    """GPT-2: per layer c_attn (h, 3h), attn c_proj (h, h), c_fc (h, 4h), mlp c_proj (4h, h), then the (tied)
    lm_head (vocab, h)."""
    h, layers = cfg.n_embd, cfg.n_layer
    return 2 * (layers * 12 * h * h + cfg.vocab_size * h), layers * 4 * h


# the tiny models of tests/conftest.py, written out: hidden 64, 2 layers, 4 heads of 16, vocab 131
EXPECTED = {
    "llama": (151_936, 512),  # 2 * (2 * (4096 + 2 * 2048 + 4096 + 3 * 7168) + 131 * 64); 2 * 4 * 4 * 16
    "qwen2": (143_744, 512),  # one kv head: k and v are (64, 16)
    "gpt2": (213_376, 512),  # 2 * (2 * 12 * 64 * 64 + 131 * 64)
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_hand_formula_matches_the_written_out_numbers(arch):
    cfg = make_model(arch).config
    assert (gpt2_flops if arch == "gpt2" else llama_like_flops)(cfg) == EXPECTED[arch]


@pytest.fixture(scope="module")
def llama_captured() -> GraphIR:
    return capture(make_model("llama"))


def test_captured_graph(llama_captured):
    """As captured: aten.linear layers and scaled_dot_product_attention."""
    assert cost(llama_captured) == Cost(*EXPECTED["llama"])


@pytest.mark.parametrize("arch", list(EXPECTED))
@pytest.mark.parametrize("layout", ["source", "transposed"])
def test_optimized_and_loaded_graphs(arch, layout, artifacts, monkeypatch):
    """After the default pipeline (attention fused into lmforge.attention) and the load-time layouts (weights
    transposed into matmul(x, W.T)); GPT-2's Conv1D layers are addmm on (in, out) weights."""
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", layout)
    monkeypatch.setenv("LMFORGE_BIND", "0")  # keep the registered ops, which the cost model reads
    ir = lmforge.load(artifacts(arch)).ir
    assert cost(ir) == Cost(*EXPECTED[arch])


@pytest.mark.parametrize("quant", ["int4", "fp8"])
def test_quantized_layers_cost_what_the_float_ones_do(quant, tmp_path, monkeypatch):
    """int4 packs two weights per byte (qweight (N, K // 2)) and fp8 one (N, K); both still do N * K
    multiply-adds per token. lm_head stays in float (the default skip list)."""
    settings = {"group_size": 32} if quant == "int4" else {}  # the default 128 exceeds in_features 64
    art = lmforge.optimize(make_model("llama"), tmp_path / quant, max_seq_len=16, quant=quant, **settings)
    monkeypatch.setenv("LMFORGE_BIND", "0")
    ir = lmforge.load(art.path).ir
    ops = {n.target for n in ir.graph.nodes if n.op == "call_function"}
    assert getattr(torch.ops.lmforge, f"{quant}_linear").default in ops
    assert cost(ir) == Cost(*EXPECTED["llama"])


def test_flops_per_token_grow_with_the_context():
    c = Cost(*EXPECTED["llama"])
    assert c.flops_per_token(0) == 151_936
    assert c.flops_per_token(1000) == 151_936 + 512 * 1000


def _spec(*shape, dtype=torch.float32) -> TensorSpec:
    return TensorSpec(tuple(shape), dtype)


def test_only_weight_matmuls_and_attention_are_counted():
    """A hand-built graph: a linear on a weight (16, 8) and a Conv1D-style mm on a weight (8, 4) count; a
    matmul of two activations, a linear on a computed weight, elementwise work and a bias do not."""
    root = torch.nn.Module()
    root.register_buffer("w", torch.randn(16, 8))
    root.register_buffer("u", torch.randn(8, 4))
    root.register_buffer("b", torch.randn(16))
    g = fx.Graph()

    def node(kind, target, args, spec):
        n = getattr(g, kind)(target, args) if kind == "call_function" else getattr(g, kind)(target)
        n.meta["spec"] = spec
        return n

    x = node("placeholder", "x", None, _spec("batch", 8))
    w, u, b = node("get_attr", "w", None, _spec(16, 8)), node("get_attr", "u", None, _spec(8, 4)), node("get_attr", "b", None, _spec(16))
    y = node("call_function", aten.linear.default, (x, w, b), _spec("batch", 16))  # 2 * 16 * 8 = 256
    z = node("call_function", aten.mm.default, (x, u), _spec("batch", 4))  # 2 * 8 * 4 = 64
    xt = node("call_function", aten.t.default, (x,), _spec(8, "batch"))
    gram = node("call_function", aten.mm.default, (x, xt), _spec("batch", "batch"))  # two activations
    w2 = node("call_function", aten.mul.Tensor, (w, 2.0), _spec(16, 8))
    y2 = node("call_function", aten.linear.default, (x, w2), _spec("batch", 16))  # a computed weight
    q = node("placeholder", "q", None, _spec("batch", 4, "seq", 16))
    attn = node("call_function", aten.scaled_dot_product_attention.default, (q, q, q), _spec("batch", 4, "seq", 16))
    g.output((y, z, gram, y2, attn))
    ir = GraphIR(gm=fx.GraphModule(root, g), config={}, kv=KVCacheSpec([], torch.float32), weight_names={},
                 kind="subgraph")
    assert cost(ir) == Cost(256 + 64, 4 * 4 * 16)


def test_attention_with_symbolic_heads_is_not_guessed():
    """Attention whose head count is only known at run time adds nothing rather than a made-up number."""
    g = fx.Graph()
    q = g.placeholder("q")
    q.meta["spec"] = _spec("batch", "heads", "seq", 16)
    attn = g.call_function(aten.scaled_dot_product_attention.default, (q, q, q))
    attn.meta["spec"] = q.meta["spec"]
    g.output((attn,))
    ir = GraphIR(gm=fx.GraphModule(torch.nn.Module(), g), config={}, kv=KVCacheSpec([], torch.float32),
                 weight_names={}, kind="subgraph")
    assert cost(ir) == Cost(0, 0)
