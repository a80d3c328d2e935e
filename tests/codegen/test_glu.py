"""`lmforge::glu` (codegen/glu.py): its reference against the float64 formulas, the CPU kernel (cpu/gemv.c) and
the Triton kernel (codegen/kernels/glu.py, under TRITON_INTERPRET=1 on the CPU) against a float64 reference
rounded where PyTorch rounds, the dispatch between them, the fake (meta) implementation and the verify rule.

Odd sizes on purpose (no row is a multiple of a vector width), random inputs wide enough to reach both
tails of each activation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import fx

import lmforge.codegen.glu as glu_op
from lmforge.codegen import cpu_gemv
from lmforge.codegen.glu import glu
from lmforge.ir.graph import GraphIR, KVCacheSpec
from lmforge.ir.ops import Casts, op_facts
from lmforge.ir.spec import TensorSpec
from lmforge.ir.verify import VerifyError, verify

ACTS = ("silu", "gelu", "gelu_tanh")


def act64(act: str, g: torch.Tensor) -> torch.Tensor:
    """The activations written out in float64, independently of PyTorch's own."""
    g = g.double()
    if act == "silu":
        return g / (1 + torch.exp(-g))
    if act == "gelu":
        return 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))


def want64(act: str, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """act(g) * u in float64, rounded to g's dtype where PyTorch rounds: after the activation, after the product."""
    a = act64(act, g).to(g.dtype).double()
    return (a * u.double()).to(g.dtype)


def inputs(shape, dtype, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # the two halves of one (..., 2F) projection, as Phi-3's split gate_up gives them
        both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 3).to(dtype)
        return both[..., :shape[-1]], both[..., shape[-1]:]
    return (torch.randn(*shape, generator=gen) * 3).to(dtype), torch.randn(*shape, generator=gen).to(dtype)


def assert_rounded_close(y, want, eps):
    """y equals `want` (float64 rounded where PyTorch rounds) up to an activation rounded the other way: a float32
    exp/erf one ulp off can land act(g) one ulp of the dtype over (relative eps), and the product with it."""
    assert y.dtype == want.dtype and y.shape == want.shape
    diff = (y.double() - want.double()).abs()
    assert (diff <= 2 * eps * want.double().abs() + 1e-6).all(), diff.max()
    if y.dtype != torch.float32:  # float32 computes in float32: a few ulp off, never exactly the float64 result
        # all but a few are exactly the rounded float64 result; not in the far tails, where a float32
        # 0.5 g (1 + erf(...)) or 0.5 g (1 + tanh(...)) loses digits to cancellation (PyTorch's own does)
        kept = want.double().abs() >= 1e-2
        assert (y[kept] == want[kept]).double().mean() > 0.97


# --- the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTS)
def test_reference_is_the_float64_formula(act):
    g, u = inputs((3, 37), torch.float64)
    torch.testing.assert_close(glu_op.reference(g, u, act), act64(act, g) * u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ACTS)
def test_reference_rounds_the_activation_in_half_precision(act):
    # act(g) is rounded to bfloat16 before the product (two roundings, as HF's act_fn(gate) * up): one rounding of
    # the float64 product would differ in many places
    g, u = inputs((4, 301), torch.bfloat16, seed=1)
    got = glu_op.reference(g, u, act)
    assert_rounded_close(got, want64(act, g, u), 2 ** -8)
    once = (act64(act, g) * u.double()).bfloat16()
    assert (got != once).sum() > 10


def test_unknown_act_is_refused():
    g, u = inputs((2, 5), torch.float32)
    for call in (glu_op.reference, glu):
        with pytest.raises((ValueError, RuntimeError), match="act must be one of silu, gelu, gelu_tanh, got 'relu'"):
            call(g, u, "relu")


# --- the CPU kernel -----------------------------------------------------------------------------------

cpu_only = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler to build the CPU kernel")
# the native build and the plain-C one (the AVX-512 path and the scalar path)
VARIANTS = {"native": (), "no-avx512": ("-mno-avx512f",)}


@pytest.fixture(scope="module", params=list(VARIANTS))
def kernel(request):
    if not cpu_gemv.available():
        pytest.skip("no C compiler to build the CPU kernel")
    return cpu_gemv.Kernel(cpu_gemv.build(VARIANTS[request.param]))


@cpu_only
@pytest.mark.parametrize("act", cpu_gemv.GLU_ACTS)
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("F", [1, 15, 17, 112, 301])
@pytest.mark.parametrize("dtype", cpu_gemv.GLU_DTYPES)
def test_cpu_kernel_matches_float64(kernel, act, M, F, dtype):
    g, u = inputs((M, F), dtype, seed=M * 1000 + F)
    assert_rounded_close(kernel.glu(g, u, act), want64(act, g, u), EPS[dtype])


@cpu_only
@pytest.mark.parametrize("act", cpu_gemv.GLU_ACTS)
@pytest.mark.parametrize("dtype", cpu_gemv.GLU_DTYPES)
def test_cpu_kernel_strided_rows_leading_dims_and_extremes(kernel, act, dtype):
    g, u = inputs((2, 3, 45), dtype, strided=True)  # rows with a stride of 90
    assert_rounded_close(kernel.glu(g, u, act), want64(act, g, u), EPS[dtype])
    big = torch.tensor([[-300.0, -90.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 90.0, 300.0, 3e38, -3e38]]).to(dtype)
    ones = torch.ones_like(big)
    torch.testing.assert_close(kernel.glu(big, ones, act), glu_op.reference(big, ones, act), rtol=2 * EPS[dtype], atol=0)
    special = torch.tensor([[float("nan"), float("inf")]]).to(dtype)  # NaN stays NaN; act(inf) = inf
    torch.testing.assert_close(kernel.glu(special, torch.ones_like(special), act),
                               glu_op.reference(special, torch.ones_like(special), act), equal_nan=True)


@cpu_only
def test_cpu_op_runs_the_kernel_for_decode_rows_only():
    # gelu_tanh tells the two apart: the kernel's g / (1 + e^(-2v)) avoids the cancellation in PyTorch's
    # 0.5 g (1 + tanh(v)) for negative g, so some roundings differ
    kernel = cpu_gemv.kernel()
    g, u = inputs((glu_op.KERNEL_MAX_ROWS, 301), torch.bfloat16, seed=3)
    got = glu(g, u, "gelu_tanh")
    assert torch.equal(got, kernel.glu(g, u, "gelu_tanh")) and not torch.equal(got, glu_op.reference(g, u, "gelu_tanh"))
    g, u = inputs((glu_op.KERNEL_MAX_ROWS + 1, 301), torch.bfloat16, seed=3)  # prefill: PyTorch's threaded ops
    assert torch.equal(glu(g, u, "gelu_tanh"), glu_op.reference(g, u, "gelu_tanh"))
    g, u = inputs((2, 33), torch.float32)  # float32 decode rows: the kernel too
    assert torch.equal(glu(g, u, "silu"), kernel.glu(g, u, "silu"))
    g, u = inputs((2, 33), torch.float16)  # no kernel: the reference, exactly
    assert torch.equal(glu(g, u, "silu"), glu_op.reference(g, u, "silu"))
    g, u = inputs((2, 33), torch.bfloat16)
    assert torch.equal(glu(g, u, "gelu"), glu_op.reference(g, u, "gelu"))  # exact GELU: no CPU kernel
    assert torch.equal(glu(g, u[:1], "silu"), glu_op.reference(g, u[:1], "silu"))  # broadcasting: the reference


# --- the Triton kernel --------------------------------------------------------------------------------

EPS = {torch.float32: 2 ** -20, torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}


@pytest.fixture(scope="module")
def triton_glu():
    return pytest.importorskip("lmforge.codegen.kernels.glu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape,strided", [((1, 1), False), ((3, 77), False), ((2, 5, 33), True)])
def test_triton_kernel_matches_float64(triton_glu, dtype, act, shape, strided):
    g, u = inputs(shape, dtype, seed=len(shape) + shape[-1], strided=strided)
    y = triton_glu.glu(g, u, act)
    assert y.is_contiguous()
    assert_rounded_close(y, want64(act, g, u), EPS[dtype])


def test_triton_kernel_refusals(triton_glu):
    g, u = inputs((2, 8), torch.float32)
    with pytest.raises(ValueError, match="one shape and one dtype"):
        triton_glu.glu(g, u.double(), "silu")
    with pytest.raises(ValueError, match="one shape and one dtype"):
        triton_glu.glu(g, u[:1], "silu")
    assert triton_glu.glu(g[:0], u[:0], "silu").shape == (0, 8)


def test_op_runs_triton_when_asked(triton_glu, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "triton")
    g, u = inputs((2, 40), torch.float32, seed=5)  # float32: no CPU kernel, and Triton's exp is not PyTorch's
    got = glu(g, u, "gelu_tanh")
    assert torch.equal(got, triton_glu.glu(g, u, "gelu_tanh"))
    assert not torch.equal(got, glu_op.reference(g, u, "gelu_tanh"))


# --- fake, facts, verify ------------------------------------------------------------------------------


def test_fake_gives_shape_and_dtype():
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.empty(2, 7, 112, dtype=dtype, device="meta")
        y = glu(g, torch.empty_like(g), "silu")
        assert y.device.type == "meta" and y.shape == (2, 7, 112) and y.dtype == dtype
    with torch._subclasses.FakeTensorMode() as mode:
        g = mode.from_tensor(torch.empty(3, 5))
        assert glu(g, g, "gelu").shape == (3, 5)


def test_facts():
    facts = op_facts(glu)
    assert facts.shard == "elementwise" and facts.cpu is glu_op.glu_impl and facts.cost is None
    assert facts.casts == Casts((1,), 0, "cast-glu-input")  # up in gate's dtype


def _one_glu(gate_spec, up_spec, act="silu") -> GraphIR:
    g = fx.Graph()
    gate, up = g.placeholder("gate"), g.placeholder("up")
    gate.meta["spec"], up.meta["spec"] = gate_spec, up_spec
    node = g.call_function(glu, (gate, up, act))
    node.meta["spec"] = gate_spec
    g.output((node,))
    return GraphIR(gm=fx.GraphModule(torch.nn.Module(), g), config={}, kv=KVCacheSpec([], torch.float32),
                   weight_names={}, kind="subgraph")


def test_verify_rule():
    bf16 = TensorSpec(("batch", "seq", 112), torch.bfloat16)
    verify(_one_glu(bf16, bf16))
    verify(_one_glu(bf16, bf16, "gelu_tanh"))
    bad = {
        "inputs of different dtypes: bfloat16, float32": _one_glu(bf16, TensorSpec(bf16.shape, torch.float32)),
        "differ in shape": _one_glu(bf16, TensorSpec(("batch", "seq", 56), torch.bfloat16)),
        "act 'relu' is not one of silu, gelu, gelu_tanh": _one_glu(bf16, bf16, "relu"),
    }
    for message, ir in bad.items():
        with pytest.raises(VerifyError, match="'glu'") as err:
            verify(ir)
        assert message in str(err.value)
