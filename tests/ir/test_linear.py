"""The linear-layer recognizer (`lmforge/ir/linear.py`): every form a linear layer takes, what it reports for
each (the weight attribute, whether it holds W.T, the transpose it reads through, x and the bias), what it
rejects, and that it finds exactly the Hugging Face model's linear layers in captured graphs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx

from lmforge.codegen.linear import linear as lmforge_linear
from lmforge.codegen.quant_linear import fp8_linear, int4_linear, int4_linear_impl
from lmforge.ir.capture import capture
from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.linear import Linear, as_linear, find_linears
from lmforge.ir.ops import LinearForm
from lmforge.ir.spec import TensorSpec
from lmforge.passes import PassManager
from tests.conftest import make_model

aten = torch.ops.aten
IN, OUT = 8, 6


def _hf_linear_layers(model) -> dict[str, torch.nn.Module]:
    """The model's linear layers, counted on the Hugging Face modules: nn.Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


# --- hand-built forms ----------------------------------------------------------------------------------


class _Builder:
    """A small subgraph-kind GraphIR with real weights, so a recognized form can also be run."""

    def __init__(self):
        self.g = fx.Graph()
        self.root = torch.nn.Module()
        gen = torch.Generator().manual_seed(0)
        self.tensors = {
            "W": torch.randn(OUT, IN, generator=gen),  # (out, in), as nn.Linear holds it
            "A": torch.randn(IN, OUT, generator=gen),  # (in, out) = W.T, as GPT-2's Conv1D holds it
            "b": torch.randn(OUT, generator=gen),
            "W3": torch.randn(2, OUT, IN, generator=gen),
        }
        for name, t in self.tensors.items():
            self.root.register_buffer(name, t)
        self.x = self.node("placeholder", "x", shape=(3, IN))

    def node(self, op, target, args=(), kwargs=None, shape=None, dtype=torch.float32):
        n = getattr(self.g, op)(target) if op in ("placeholder", "get_attr") else self.g.call_function(target, args, kwargs)
        if shape is None and op == "get_attr":
            shape = tuple(self.tensors[target].shape)
        n.meta["spec"] = TensorSpec(tuple(shape or ()), dtype)
        return n

    def attr(self, name):
        return self.node("get_attr", name)

    def call(self, target, *args, shape=(3, OUT), **kwargs):
        return self.node("call_function", target, args, kwargs, shape=shape)

    def t(self, arg):
        shape = tuple(reversed(arg.meta["spec"].shape))
        return self.call(aten.t.default, arg, shape=shape)

    def ir(self, *outputs) -> GraphIR:
        self.g.output(tuple(outputs))
        return GraphIR(gm=fx.GraphModule(self.root, self.g), config={}, kv=KVCacheSpec([], torch.float32),
                       weight_names={}, kind="subgraph")


# form -> build(b) returning the node; (weight attribute, transposed, through's target, bias attribute)
FORMS = {
    "linear(x, W)": (lambda b: b.call(aten.linear.default, b.x, b.attr("W")), ("W", False, None, None)),
    "linear(x, W, b)": (lambda b: b.call(aten.linear.default, b.x, b.attr("W"), b.attr("b")), ("W", False, None, "b")),
    "linear(x, t(A), b)": (lambda b: b.call(aten.linear.default, b.x, b.t(b.attr("A")), b.attr("b")),
                           ("A", True, aten.t.default, "b")),
    "linear(x, permute(A, [1, 0]))": (lambda b: b.call(aten.linear.default, b.x,
                                                       b.call(aten.permute.default, b.attr("A"), [1, 0], shape=(OUT, IN))),
                                      ("A", True, aten.permute.default, None)),
    "linear(x, transpose(A, 0, 1))": (lambda b: b.call(aten.linear.default, b.x,
                                                       b.call(aten.transpose.int, b.attr("A"), 0, 1, shape=(OUT, IN))),
                                      ("A", True, aten.transpose.int, None)),
    "mm(x, A)": (lambda b: b.call(aten.mm.default, b.x, b.attr("A")), ("A", True, None, None)),
    "matmul(x, A)": (lambda b: b.call(aten.matmul.default, b.x, b.attr("A")), ("A", True, None, None)),
    "mm(x, t(W))": (lambda b: b.call(aten.mm.default, b.x, b.t(b.attr("W"))), ("W", False, aten.t.default, None)),
    "matmul(x, t(W))": (lambda b: b.call(aten.matmul.default, b.x, b.t(b.attr("W"))), ("W", False, aten.t.default, None)),
    "addmm(b, x, A)": (lambda b: b.call(aten.addmm.default, b.attr("b"), b.x, b.attr("A")), ("A", True, None, "b")),
    "addmm(b, x, t(W))": (lambda b: b.call(aten.addmm.default, b.attr("b"), b.x, b.t(b.attr("W"))),
                          ("W", False, aten.t.default, "b")),
    "addmm(b, x, A, beta=1, alpha=1)": (lambda b: b.call(aten.addmm.default, b.attr("b"), b.x, b.attr("A"), beta=1, alpha=1),
                                        ("A", True, None, "b")),
    "lmforge.linear(x, W, b)": (lambda b: b.call(lmforge_linear, b.x, b.attr("W"), b.attr("b")), ("W", False, None, "b")),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_is_recognized_with_its_weight_and_layout(form):
    """Each form gives the weight's get_attr, whether it holds W.T, the transpose in between, x and the bias;
    and W rebuilt from those (attribute, transposed) computes what the node computes."""
    build, (weight, transposed, through, bias) = FORMS[form]
    b = _Builder()
    node = build(b)
    ir = b.ir(node)
    lin = as_linear(node)
    assert isinstance(lin, Linear) and lin.node is node
    assert lin.weight.op == "get_attr" and lin.weight.target == weight
    assert lin.transposed is transposed
    assert (lin.through.target if lin.through is not None else None) == through
    if through is not None:
        assert lin.through.args[0] is lin.weight and node in lin.through.users
    assert lin.x is b.x
    assert (lin.bias.target if lin.bias is not None else None) == bias
    # the form says where W's axes are in the argument the op reads: its out axis has OUT features
    (w_pos, out_axis, in_axis, unit), = lin.form.weights
    assert node.args[w_pos].meta["spec"].shape[out_axis] == OUT and node.args[w_pos].meta["spec"].shape[in_axis] == IN
    assert unit == "col" and lin.form.x_pos == node.args.index(b.x)
    # numerically: y = x @ W.T + b with W the attribute, transposed back when it holds W.T
    held = ir.weight(lin.weight.target)
    W = held.t() if lin.transposed else held
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    want = F.linear(x, W, None if lin.bias is None else ir.weight(lin.bias.target))
    torch.testing.assert_close(ir.gm(x)[0], want)


def test_quantized_ops_take_the_form_their_facts_declare():
    """int4_linear and fp8_linear (and a node bound to a CPU implementation) are linears in the form their
    OpFacts give, the first weight tensor (qweight) being the reported weight; read through a transpose they
    are not."""
    b = _Builder()
    q = b.node("get_attr", "qweight", shape=(OUT, IN // 2), dtype=torch.uint8)
    s = b.node("get_attr", "scales", shape=(OUT, IN // 4))
    z = b.node("get_attr", "zeros", shape=(OUT, IN // 4))
    bias = b.attr("b")
    i4 = b.call(int4_linear, b.x, q, s, z, 4, bias)
    i4_sym = b.call(int4_linear, b.x, q, s, None, 4)
    bound = b.call(int4_linear_impl, b.x, q, s, z, 4)  # what bind-cpu-kernels makes of it
    w8 = b.node("get_attr", "w8", shape=(OUT, IN), dtype=torch.float8_e4m3fn)
    s8 = b.node("get_attr", "s8", shape=(OUT,))
    f8 = b.call(fp8_linear, b.x, w8, s8)
    through = b.call(int4_linear, b.x, b.call(aten.t.default, q, shape=(IN // 2, OUT)), s, z, 4)

    lin = as_linear(i4)
    assert lin.weight is q and not lin.transposed and lin.through is None and lin.x is b.x and lin.bias is bias
    assert lin.form == LinearForm(0, ((1, 0, 1, "byte"), (2, 0, 1, "group"), (3, 0, 1, "group")), 5, group=4)
    lin = as_linear(i4_sym)
    assert lin.form == LinearForm(0, ((1, 0, 1, "byte"), (2, 0, 1, "group")), 5, group=4) and lin.bias is None
    lin = as_linear(bound)
    assert lin is not None and lin.weight is q and lin.form.group == 4
    lin = as_linear(f8)
    assert lin.weight is w8 and lin.form == LinearForm(0, ((1, 0, 1, "col"), (2, 0, None, "col")), 3)
    assert as_linear(through) is None
    assert [lin.node for lin in find_linears(b.g)] == [i4, i4_sym, bound, f8]


def test_a_bias_passed_by_keyword_is_found():
    b = _Builder()
    bias = b.attr("b")
    node = b.call(lmforge_linear, b.x, b.attr("W"), b=bias, shape=(3, OUT))
    b.ir(node)
    assert as_linear(node).bias is bias


def test_non_linears_are_rejected():
    """Not a linear layer: a matmul of two activations (attention's q @ k.T), a weight that is not a graph
    weight (an input, a computed or cast tensor), a weight on the wrong side, a 3-D weight, a permute that is
    not a transpose, addmm with beta or alpha other than 1, other ops and non-call nodes."""
    b = _Builder()
    q = b.node("placeholder", "q", shape=(2, 4, 5, 16))
    k = b.node("placeholder", "k", shape=(2, 4, 5, 16))
    w_in = b.node("placeholder", "w_in", shape=(OUT, IN))
    kt = b.call(aten.transpose.int, k, -2, -1, shape=(2, 4, 16, 5))
    W, A = b.attr("W"), b.attr("A")
    rejected = {
        "q @ k.T": b.call(aten.matmul.default, q, kt, shape=(2, 4, 5, 5)),
        "mm of activations": b.call(aten.mm.default, b.x, b.call(aten.t.default, b.x, shape=(IN, 3)), shape=(3, 3)),
        "weight is an input": b.call(aten.linear.default, b.x, w_in),
        "weight is computed": b.call(aten.linear.default, b.x, b.call(aten.mul.Tensor, W, 2.0, shape=(OUT, IN))),
        "weight is cast": b.call(aten.linear.default, b.x,
                                 b.call(aten._to_copy.default, W, dtype=torch.float32, shape=(OUT, IN))),
        "weight transposed twice": b.call(aten.linear.default, b.x, b.t(b.t(W))),
        "weight on the left": b.call(aten.mm.default, A, b.call(aten.t.default, b.x, shape=(IN, 3)), shape=(IN, 3)),
        "3-D weight": b.call(aten.matmul.default, b.x, b.attr("W3"), shape=(2, 3, OUT)),
        "permute that keeps the axes": b.call(aten.linear.default, b.x,
                                              b.call(aten.permute.default, W, [0, 1], shape=(OUT, IN))),
        "transpose of an axis with itself": b.call(aten.linear.default, b.x,
                                                   b.call(aten.transpose.int, W, 0, -2, shape=(OUT, IN))),
        "addmm beta=2": b.call(aten.addmm.default, b.attr("b"), b.x, A, beta=2),
        "addmm alpha=0.5": b.call(aten.addmm.default, b.attr("b"), b.x, A, alpha=0.5),
        "add": b.call(aten.add.Tensor, b.x, b.x, shape=(3, IN)),
    }
    b.ir(*rejected.values())
    for why, node in rejected.items():
        assert as_linear(node) is None, why
    for node in b.g.nodes:
        if node.op != "call_function":
            assert as_linear(node) is None, node.op
    assert find_linears(b.g) == []


# --- captured graphs -------------------------------------------------------------------------------------


_captured: dict[str, tuple] = {}


def _captured_ir(arch: str):
    """(HF model, its captured GraphIR), captured once per module; tests that rewrite it take a deep copy."""
    if arch not in _captured:
        model = make_model(arch)
        _captured[arch] = (model, capture(model))
    return _captured[arch]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_captured_graph_has_every_hf_linear_layer(arch):
    """find_linears on the captured graph finds one linear per nn.Linear / Conv1D of the HF model, reading
    that module's weight, in the layout the module holds it (Conv1D: W.T), with its bias and input width."""
    from transformers.pytorch_utils import Conv1D

    model, ir = _captured_ir(arch)
    layers = _hf_linear_layers(model)
    found = find_linears(ir.graph)
    assert len(found) == len(layers) > 0
    by_weight = {ir.weight_names[lin.weight.target]: lin for lin in found}
    assert set(by_weight) == {f"{name}.weight" for name in layers}
    for name, module in layers.items():
        lin = by_weight[f"{name}.weight"]
        conv = isinstance(module, Conv1D)
        assert lin.transposed is conv and lin.through is None
        assert lin.node.target is (aten.addmm.default if conv else aten.linear.default)
        assert torch.equal(ir.weight(lin.weight.target), module.weight)
        in_features = module.weight.shape[0] if conv else module.in_features
        assert lin.x.meta["spec"].shape[-1] == in_features
        if module.bias is None:
            assert lin.bias is None
        else:
            assert torch.equal(ir.weight(lin.bias.target), module.bias)


@pytest.mark.parametrize("arch, scheme, op", [("llama", "int4", int4_linear), ("gpt2", "fp8", fp8_linear)])
def test_quantized_graph_keeps_every_linear_layer(arch, scheme, op):
    """After quantize, each quantized layer is found as its lmforge op (weight: the packed tensor), each kept one
    as before; the count still equals the HF model's linear layers."""
    model, captured = _captured_ir(arch)
    ir = copy.deepcopy(captured)
    options = "scheme=int4,group_size=32" if scheme == "int4" else "scheme=fp8"
    PassManager(f"remove-noops,dce,quantize{{{options}}}").run(ir)
    found = find_linears(ir.graph)
    layers = _hf_linear_layers(model)
    assert len(found) == len(layers)
    quantized = [lin for lin in found if lin.node.target is op]
    assert len(quantized) == len(ir.quantization["layers"]) > 0
    assert {ir.weight_names[lin.weight.target] for lin in quantized} == {f"{l}.qweight" for l in ir.quantization["layers"]}
    kept = {ir.weight_names[lin.weight.target] for lin in found if lin.node.target is not op}
    assert kept == {f"{name}.weight" for name in ir.quantization["kept"]}
