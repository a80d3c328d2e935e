"""The scheme registry and its handlers: lookups by name, config and op; each handler's packing (against its
dequantize and its op), weight kinds, argument order and linear form; and a scheme added in one place (here,
in this file) going through the quantize pass and the manifest, which know no scheme by name."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx

import lmforge.codegen  # noqa: F401  (defines the ops the schemes emit)
from lmforge.errors import LmforgeError
from lmforge.ir import ops
from lmforge.ir.ops import Casts, LinearForm, OpFacts
from lmforge.quant import (SCHEMES, Fp8Config, Int4Config, Int8Config, PackedTensor, QuantScheme, handler, handler_for,
                           handler_for_op, register_scheme)
from lmforge.quant import scheme as registry
from tests.conftest import make_model, random_ids

CONFIGS = [Int4Config(group_size=32), Int4Config(group_size=32, symmetric=True), Int4Config(group_size=32, method="hqq"),
           Fp8Config(), Int8Config()]


def test_lookups_by_name_config_and_op():
    assert list(SCHEMES) == ["int4", "fp8", "int8"]  # the order messages list them in
    for name, scheme in SCHEMES.items():
        assert handler(name) is scheme is handler_for(scheme.config()) is handler_for_op(scheme.op)
    assert handler_for_op(torch.ops.aten.mm.default) is None and handler_for_op(len) is None
    with pytest.raises(LmforgeError, match="unknown quantization scheme 'int3'; known: int4, fp8, int8"):
        handler("int3")


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_pack_matches_dequantize_and_the_op(cfg):
    """pack -> dequantize stays near W; the op, called with `op_args` on the packed tensors, computes
    x @ dequantize(W)^T + b; fp8 and int8 scales are buffers (convert-dtype leaves them float32), the rest
    parameters."""
    scheme = handler_for(cfg)
    gen = torch.Generator().manual_seed(0)
    N, K = 48, 64
    w, x, b = torch.randn(N, K, generator=gen), torch.randn(3, K, generator=gen), torch.randn(N, generator=gen)
    packed = scheme.pack(w, cfg, torch.float32)
    tensors = {p.suffix: p.tensor for p in packed if p.tensor is not None}
    want_kinds = {"qweight": "parameter", "scales": "buffer" if scheme.name in ("fp8", "int8") else "parameter"}
    if not getattr(cfg, "symmetric", True):
        want_kinds["zeros"] = "parameter"
    assert {p.suffix: p.kind for p in packed if p.tensor is not None} == want_kinds
    dense = scheme.dequantize(tensors, cfg)
    assert dense.shape == (N, K) and (dense - w).abs().max() < 0.1 * w.abs().max()
    y = scheme.op(*scheme.op_args(x, [p.tensor for p in packed], cfg, b))
    if scheme.name == "fp8":  # the op also rounds the activations to e4m3
        assert (y - F.linear(x, dense, b)).abs().max() < 0.05 * y.abs().max()
    else:
        torch.testing.assert_close(y, F.linear(x, dense, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_linear_form_points_at_the_packed_tensors(cfg):
    """`linear_form` names the op's input, bias and every packed tensor, with W's out axis and its in axis in
    the unit the tensor stores (a column, a byte of two columns, a group of columns): what shard cuts."""
    scheme = handler_for(cfg)
    N, K = 48, 64
    packed = [p for p in scheme.pack(torch.randn(N, K), cfg, torch.float32)]
    graph = fx.Graph()
    x, bias = graph.placeholder("x"), graph.get_attr("bias")
    gets = [graph.get_attr(p.suffix) if p.tensor is not None else None for p in packed]
    node = graph.call_function(scheme.op, scheme.op_args(x, gets, cfg, bias))
    form = scheme.linear_form(node)
    assert isinstance(form, LinearForm) and node.args[form.x_pos] is x and node.args[form.bias_pos] is bias
    by_name = {p.suffix: p.tensor for p in packed if p.tensor is not None}
    assert [node.args[pos].target for pos, *_ in form.weights] == list(by_name)
    units = {"col": K, "byte": K // 2, "group": K // form.group}
    for pos, out_axis, in_axis, unit in form.weights:
        tensor = by_name[node.args[pos].target]
        assert tensor.shape[out_axis] == N
        assert in_axis is None or tensor.shape[in_axis] == units[unit]


def test_describe_label_and_config():
    cfg = Int4Config(group_size=64, symmetric=True)
    described = handler_for(cfg).describe(cfg)
    assert described == {"scheme": "int4", "group_size": 64, "symmetric": True, "method": "rtn",
                         "zero_points": "float", "version": 1}
    assert handler("int4").label(described) == "int4 g64 sym rtn"
    asym_int = handler("int4").describe(Int4Config(zero_points="int"))
    assert handler("int4").label(asym_int) == "int4 g128 asym int-zp rtn"
    # a manifest from before the setting: fractional zero points
    assert handler("int4").label({k: v for k, v in asym_int.items() if k != "zero_points"}) == "int4 g128 asym rtn"
    assert handler("fp8").label(handler("fp8").describe(Fp8Config())) == "fp8"
    assert handler("int4").settings == ("group_size", "symmetric", "method", "zero_points")
    assert handler("fp8").settings == ()
    assert handler("fp8").make_config(group_size=64) == Fp8Config()
    assert handler("int8").label(handler("int8").describe(Int8Config())) == "int8" and handler("int8").settings == ()


# --- a scheme added in one place ----------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    """Scheme `toy`, version 1: int8 weights with one scale per output channel."""

    version: int = 1

    def unsuitable(self, shape: tuple[int, ...]) -> str | None:
        return None if len(shape) == 2 else f"a {len(shape)}-D weight"


class ToyScheme(QuantScheme):
    name = "toy"
    config = ToyConfig
    op_name = "toy_linear"
    layout = {"tensors": {"<layer>.qweight": "(N, K) int8", "<layer>.scales": "(N,) float32"},
              "dequantize": "W[n, k] = qweight[n, k] * scales[n]"}

    def pack(self, w, cfg, dtype):
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        q = torch.round(w / scale[:, None]).to(torch.int8)
        return [PackedTensor("qweight", q), PackedTensor("scales", scale, kind="buffer")]

    def dequantize(self, tensors, cfg):
        return tensors["qweight"].float() * tensors["scales"][:, None]

    def op_args(self, x, tensors, cfg, bias):
        qweight, scales = tensors
        return x, qweight, scales, bias

    def linear_form(self, node):
        return LinearForm(0, ((1, 0, 1, "col"), (2, 0, None, "col")), 3)


def _toy_linear(x, qweight, scales, bias=None):
    return F.linear(x, (qweight.float() * scales[:, None]).to(x.dtype), bias)


@pytest.fixture
def toy():
    """The toy scheme registered, with its op (as `codegen/` would declare it); both removed afterwards."""
    tables = (registry.SCHEMES, registry._BY_CONFIG, registry._BY_OP, ops._FACTS)
    saved = [dict(table) for table in tables]
    lib = torch.library.Library("lmforge", "FRAGMENT")
    lib.define("toy_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor")
    lib.impl("toy_linear", _toy_linear, "CPU")
    register_scheme(ToyScheme)
    scheme = handler("toy")
    ops.register_op(scheme.op, OpFacts(shard="linear", linear=scheme.linear_form, casts=Casts((0, 3), "compute"),
                                       params={1: 1, 2: 0}, cpu=_toy_linear))
    yield scheme
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)
    lib._destroy()


def test_a_new_scheme_is_one_handler(toy):
    """The quantize pass, layer rules and the manifest summary take a scheme they have never heard of."""
    import copy

    from lmforge.ir.capture import capture
    from lmforge.passes import PassManager
    from lmforge.export.artifact import _quantization_summary
    from tests.ir.test_capture import run_chunks

    model = make_model("llama")
    ir = capture(model)
    PassManager("remove-noops,dce,fuse-attention,quantize{scheme=toy,overrides=*.layers.0.*:int4+g32}").run(ir)
    layers = ir.quantization["layers"]
    assert {cfg["scheme"] for name, cfg in layers.items() if ".layers.1." in name} == {"toy"}
    assert layers["model.layers.0.self_attn.q_proj"]["scheme"] == "int4"
    assert ir.history[-1]["stats"]["toy-layers"] == 7
    assert sum(n.target is toy.op for n in ir.graph.nodes) == 7
    assert _quantization_summary(ir)["layouts"]["toy"] == ToyScheme.layout
    ref = copy.deepcopy(model)
    weights = {ir.weight_names[attr]: t for attr, t in ir.weights().items()}
    for layer, cfg in layers.items():
        scheme = handler(cfg["scheme"])
        tensors = {suffix: weights[f"{layer}.{suffix}"] for suffix in ("qweight", "scales", "zeros")
                   if f"{layer}.{suffix}" in weights}
        described = {k: v for k, v in cfg.items() if k != "scheme"}
        with torch.no_grad():
            ref.get_submodule(layer).weight.copy_(scheme.dequantize(tensors, scheme.make_config(**described)))
    ids = random_ids(1, 7, seed=2)
    with torch.no_grad():
        want = ref(ids).logits
    torch.testing.assert_close(run_chunks(ir, ids, [7]), want, rtol=1e-4, atol=1e-4)
