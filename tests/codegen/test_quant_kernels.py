"""The Triton int4, fp8 and int8 matmul kernels against float64 references, under TRITON_INTERPRET=1 on the CPU.

The references are written out in the tests (int4: `tests/conftest.int4_float64`), independently of the
ops' own (`codegen/quant_linear.py`'s `int4_reference`, `fp8_reference`, `int8_reference`):
nibbles unpacked with bit ops, group-wise dequantization, products in float64. Random inputs (never zeros),
odd N, K with several groups and blocks, M on both sides of the GEMV / tiled boundary (16 | 17), split-K
forced and chosen, zero points absent and fractional, bias and none, and x in float32, bfloat16 and float16.

Tolerances, relative to the largest |y| of the case: the kernels accumulate in float32 and round once to
x's dtype, so they may differ from float64 by half an ulp of that dtype (2**-8 bfloat16, 2**-11 float16) plus
float32 summation-order error (a few 2**-24 per term, over at most 384 terms); TOL allows one whole ulp of the
dtype, and 1e-5 for float32.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen.quant_linear import fp8_reference, int4_reference, int8_reference
from tests.conftest import int4_float64

pytest.importorskip("triton")
int4_kernels = pytest.importorskip("lmforge.codegen.kernels.int4")
fp8_kernels = pytest.importorskip("lmforge.codegen.kernels.fp8")
int8_kernels = pytest.importorskip("lmforge.codegen.kernels.int8")
split_k = pytest.importorskip("lmforge.codegen.kernels.split_k")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
E4M3 = torch.float8_e4m3fn


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, g, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype).to(DEVICE)  # + 0.1: never a zero row or sum


def close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape and torch.isfinite(got).all()
    err = (got.cpu().double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), (err, want.abs().max().item())


# --- int4 --------------------------------------------------------------------------------------------


def make_int4(M, N, K, G, dtype, zeros: bool, bias: bool, seed=0):
    g = gen(seed)
    x = randn(M, K, g=g, dtype=dtype)
    qweight = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8).to(DEVICE)
    scales = (torch.rand(N, K // G, generator=g) * 0.05 + 0.01).to(dtype).to(DEVICE)
    z = (torch.rand(N, K // G, generator=g) * 15).to(dtype).to(DEVICE) if zeros else None  # fractional
    b = randn(N, g=g, dtype=dtype) if bias else None
    return x, qweight, scales, z, b


INT4_SHAPES = [(37, 96, 32), (65, 320, 64), (40, 256, 128)]  # (N, K, G): 3, 5 and 2 groups per row


@pytest.mark.parametrize("M", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", INT4_SHAPES)
@pytest.mark.parametrize("asym_bias", [True, False], ids=["zeros+bias", "symmetric"])
def test_int4_matches_reference(M, dtype, shape, asym_bias):
    N, K, G = shape
    x, qweight, scales, zeros, bias = make_int4(M, N, K, G, dtype, asym_bias, asym_bias, seed=M + K)
    y = int4_kernels.int4_matmul(x, qweight, scales, zeros, G, bias)
    assert y.dtype == dtype
    close(y, int4_float64(x, qweight, scales, zeros, G, bias), TOL[dtype])


@pytest.mark.parametrize("zeros,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("M", [1, 5, 33])
def test_int4_zeros_and_bias_apart(M, zeros, bias):
    x, qweight, scales, z, b = make_int4(M, 65, 160, 32, torch.float32, zeros, bias, seed=3)
    close(int4_kernels.int4_matmul(x, qweight, scales, z, 32, b), int4_float64(x, qweight, scales, z, 32, b), 1e-5)


@pytest.mark.parametrize("M,n_splits", [(1, 2), (1, 5), (4, 3), (16, 10), (17, 2), (40, 4)])
def test_int4_split_k(M, n_splits):
    # K = 320 in 10 groups of 32: uneven chunks, and a request for more splits than groups at M = 16
    x, qweight, scales, zeros, bias = make_int4(M, 37, 320, 32, torch.bfloat16, True, True, seed=M)
    y = int4_kernels.int4_matmul(x, qweight, scales, zeros, 32, bias, n_splits=n_splits)
    close(y, int4_float64(x, qweight, scales, zeros, 32, bias), TOL[torch.bfloat16])


def test_int4_chosen_splits_and_strided_rows():
    # the default split count on this "machine" (4 SMs): N = 37 is 3 column tiles, so M = 1 splits K
    k_chunk, n_splits = split_k.split_k(split_k.nominal_tiles(1, 37), 1, 96, 32, torch.device("cpu"), None)
    assert n_splits > 1
    x, qweight, scales, zeros, bias = make_int4(1, 37, 96, 32, torch.float16, True, True, seed=9)
    want = int4_float64(x, qweight, scales, zeros, 32, bias)
    close(int4_kernels.int4_matmul(x, qweight, scales, zeros, 32, bias), want, TOL[torch.float16])
    # x a view of wider rows (row stride 224, not K)
    wide, qweight, scales, zeros, bias = make_int4(20, 37, 224, 32, torch.float32, True, False, seed=10)
    x = wide[:, 64:160]
    qweight, scales, zeros = qweight[:, :48].contiguous(), scales[:, :3].contiguous(), zeros[:, :3].contiguous()
    want = int4_float64(x, qweight, scales, zeros, 32, None)
    close(int4_kernels.int4_matmul(x, qweight, scales, zeros, 32), want, 1e-5)


class _Spy:
    """Counts launches of an autotuned kernel (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def test_int4_path_by_m(monkeypatch):
    gemv, tiled = _Spy(int4_kernels._int4_gemv), _Spy(int4_kernels._int4_tiled)
    monkeypatch.setattr(int4_kernels, "_int4_gemv", gemv)
    monkeypatch.setattr(int4_kernels, "_int4_tiled", tiled)
    for M in (1, int4_kernels.SMALL_M, int4_kernels.SMALL_M + 1):
        x, qweight, scales, zeros, bias = make_int4(M, 37, 96, 32, torch.float32, True, False)
        int4_kernels.int4_matmul(x, qweight, scales, zeros, 32, bias)
    assert (gemv.calls, tiled.calls) == (2, 1)


def test_int4_reference_function_agrees():
    x, qweight, scales, zeros, bias = make_int4(5, 37, 96, 32, torch.float32, True, True)
    want = int4_float64(x, qweight, scales, zeros, 32, bias)
    close(int4_reference(x, qweight, scales, zeros, 32, bias), want, 1e-5)


# --- fp8 ---------------------------------------------------------------------------------------------


def make_fp8(M, N, K, dtype, bias: bool, seed=0):
    g = gen(seed)
    x = randn(M, K, g=g, dtype=dtype) * torch.linspace(0.5, 4.0, M, device=DEVICE)[:, None].to(dtype)  # rows differ
    weight = (torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(E4M3).to(DEVICE)
    weight_scale = (torch.rand(N, generator=g) * 0.01 + 0.002).to(DEVICE)
    b = randn(N, g=g, dtype=dtype) if bias else None
    return x, weight, weight_scale, b


def quantize_rows(x):
    """The activation quantization the kernel must reproduce, in torch: float32 scale, then the cast."""
    x32 = x.cpu().float()
    s = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
    return (x32 / s).clamp(-448.0, 448.0).to(E4M3), s


def fp8_reference64(x, weight, weight_scale, bias):
    """On the same rounded xq as the kernel: float64 products and sums, then both scales."""
    xq, s = quantize_rows(x)
    y = (xq.double() @ weight.cpu().double().T) * s.double() * weight_scale.cpu().double()[None, :]
    return y if bias is None else y + bias.cpu().double()


FP8_SHAPES = [(37, 100), (65, 160)]  # (N, K): K = 100 leaves a tail in every block size


@pytest.mark.parametrize("M", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_matches_quantized_reference(M, dtype, shape):
    N, K = shape
    x, weight, weight_scale, bias = make_fp8(M, N, K, dtype, bias=M % 2 == 1, seed=M + N)
    y = fp8_kernels.fp8_matmul(x, weight, weight_scale, bias)
    assert y.dtype == dtype
    close(y, fp8_reference64(x, weight, weight_scale, bias), TOL[dtype])


@pytest.mark.parametrize("M", [1, 17])
def test_fp8_close_to_unquantized(M):
    # the per-token quantization costs at most half an e4m3 step (2**-4 relative) per activation; over K
    # random terms the output moves by a few percent of its largest value, never more than 6 %
    x, weight, weight_scale, bias = make_fp8(M, 65, 160, torch.float32, bias=True, seed=5)
    w = weight.cpu().double() * weight_scale.cpu().double()[:, None]
    want = x.cpu().double() @ w.T + bias.cpu().double()
    close(fp8_kernels.fp8_matmul(x, weight, weight_scale, bias), want, 6e-2)


@pytest.mark.parametrize("M,n_splits", [(1, 3), (5, 2), (20, 4)])
def test_fp8_split_k(M, n_splits):
    x, weight, weight_scale, bias = make_fp8(M, 37, 200, torch.bfloat16, bias=True, seed=M)
    y = fp8_kernels.fp8_matmul(x, weight, weight_scale, bias, n_splits=n_splits)
    close(y, fp8_reference64(x, weight, weight_scale, bias), TOL[torch.bfloat16])


def test_fp8_rounding_is_torchs_bit_for_bit():
    # an identity weight returns s_x * xq exactly, so the kernel's xq can be read off: with max |x| = 448
    # (s_x = 1) the rows hold exact ties (1.0625 -> 1.0, 1.1875 -> 1.25), carries out of the mantissa
    # (31.9 -> 32, 126.5 -> 128), subnormals and what rounds to zero; other rows have arbitrary scales, and
    # an all-zero row takes the 1e-12 floor
    K = 64
    g = gen(7)
    special = torch.tensor([448.0, 1.0625, 1.1875, -1.0625, 31.9, 126.5, -126.5, 2.0**-9, 3 * 2.0**-10,
                            2.0**-11, -(2.0**-10) * 1.5, 0.0, 15.75, 17.0, 240.0, 232.0])
    rows = [torch.cat([special, torch.randn(K - len(special), generator=g)]), torch.randn(K, generator=g) * 1e-3,
            torch.randn(K, generator=g) * 37.0, torch.zeros(K)]
    x = torch.stack(rows).to(DEVICE)
    eye = torch.eye(K).to(E4M3).to(DEVICE)
    y = fp8_kernels.fp8_matmul(x, eye, torch.ones(K, device=DEVICE))
    xq, s = quantize_rows(x)
    assert torch.equal(y.cpu(), xq.float() * s)
    assert y[3].abs().max() == 0


def test_fp8_reference_function_agrees():
    x, weight, weight_scale, bias = make_fp8(6, 37, 100, torch.float32, bias=True)
    close(fp8_reference(x, weight, weight_scale, bias), fp8_reference64(x, weight, weight_scale, bias), 1e-5)


# --- int8 --------------------------------------------------------------------------------------------


def make_int8(M, N, K, dtype, bias: bool, seed=0):
    g = gen(seed)
    x = randn(M, K, g=g, dtype=dtype)
    qweight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8).to(DEVICE)
    scales = (torch.rand(N, generator=g) * 0.02 + 0.001).to(DEVICE)
    b = randn(N, g=g, dtype=dtype) if bias else None
    return x, qweight, scales, b


def int8_reference64(x, qweight, scales, bias):
    w = qweight.cpu().double() * scales.cpu().double()[:, None]
    return x.cpu().double() @ w.T + (0 if bias is None else bias.cpu().double())


@pytest.mark.parametrize("M", [1, 3, 16, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(37, 96), (65, 321), (5, 33)])  # (N, K): K tails of 0, 1 and 1 columns
def test_int8_matches_reference(M, dtype, shape):
    N, K = shape
    x, qweight, scales, bias = make_int8(M, N, K, dtype, bias=M % 2 == 1, seed=M + N + K)
    close(int8_kernels.int8_matmul(x, qweight, scales, bias), int8_reference64(x, qweight, scales, bias), TOL[dtype])


@pytest.mark.parametrize("M,n_splits", [(1, 3), (5, 2), (20, 4)])
def test_int8_split_k(M, n_splits):
    x, qweight, scales, bias = make_int8(M, 37, 200, torch.bfloat16, bias=True, seed=M)
    y = int8_kernels.int8_matmul(x, qweight, scales, bias, n_splits=n_splits)
    close(y, int8_reference64(x, qweight, scales, bias), TOL[torch.bfloat16])


def test_int8_strided_rows_and_reference_function():
    wide, qweight, scales, bias = make_int8(6, 37, 130, torch.float32, bias=True, seed=4)
    x = wide[:, :100]  # rows with a stride
    qweight = qweight[:, :100].contiguous()
    close(int8_kernels.int8_matmul(x, qweight, scales, bias), int8_reference64(x, qweight, scales, bias), 1e-5)
    close(int8_reference(x, qweight, scales, bias), int8_reference64(x, qweight, scales, bias), 1e-5)


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_int4_inputs_are_named():
    x, qweight, scales, zeros, bias = make_int4(2, 37, 96, 32, torch.float32, True, True)
    with pytest.raises(ValueError, match=r"qweight must be \(N, K // 2\) = \(N, 48\) uint8"):
        int4_kernels.int4_matmul(x, qweight[:, :40], scales, zeros, 32)
    with pytest.raises(ValueError, match="qweight must be"):
        int4_kernels.int4_matmul(x, qweight.to(torch.int8), scales, zeros, 32)
    with pytest.raises(ValueError, match="group_size must divide K, got group_size=64 K=96"):
        int4_kernels.int4_matmul(x, qweight, scales, zeros, 64)
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        int4_kernels.int4_matmul(x, qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match="scales must be"):
        int4_kernels.int4_matmul(x, qweight, scales[:, :2], zeros, 32)
    with pytest.raises(ValueError, match="zeros must be torch.float32"):
        int4_kernels.int4_matmul(x, qweight, scales, zeros.half(), 32)
    with pytest.raises(ValueError, match="x must be float16, bfloat16 or float32"):
        int4_kernels.int4_matmul(x.int(), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match=r"bias must be a float \(37,\) tensor"):
        int4_kernels.int4_matmul(x, qweight, scales, zeros, 32, bias[:5])


def test_bad_fp8_inputs_are_named():
    x, weight, weight_scale, bias = make_fp8(2, 37, 100, torch.float32, bias=True)
    with pytest.raises(ValueError, match="weight must be"):
        fp8_kernels.fp8_matmul(x, weight.float(), weight_scale)
    with pytest.raises(ValueError, match=r"weight must be \(N, K\) = \(N, 100\)"):
        fp8_kernels.fp8_matmul(x, weight[:, :90], weight_scale)
    with pytest.raises(ValueError, match=r"weight_scale must be float32 \(37,\)"):
        fp8_kernels.fp8_matmul(x, weight, weight_scale.half())
    with pytest.raises(ValueError, match="x must be 2-d"):
        fp8_kernels.fp8_matmul(x[None], weight, weight_scale)


def test_bad_int8_inputs_are_named():
    x, qweight, scales, bias = make_int8(2, 37, 100, torch.float32, bias=True)
    with pytest.raises(ValueError, match=r"qweight must be \(N, K\) = \(N, 100\) int8"):
        int8_kernels.int8_matmul(x, qweight[:, :90], scales)
    with pytest.raises(ValueError, match="qweight must be"):
        int8_kernels.int8_matmul(x, qweight.view(torch.uint8), scales)
    with pytest.raises(ValueError, match=r"scales must be float32 \(37,\)"):
        int8_kernels.int8_matmul(x, qweight, scales.half())
    with pytest.raises(ValueError, match=r"bias must be a float \(37,\) tensor"):
        int8_kernels.int8_matmul(x, qweight, scales, bias[:5])


# --- the GPU variants compile --------------------------------------------------------------------------

_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lmforge.codegen.kernels import fp8 as fp8_kernels
from lmforge.codegen.kernels import int4 as int4_kernels
from lmforge.codegen.kernels import int8 as int8_kernels

def build(fn, types, consts, arch, warps=4, stages=3):
    sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if types.get(name, "")[:1] == "*"}
    src = ASTSource(fn, sig, constexprs=consts, attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})

ints = dict.fromkeys(["M", "N", "K", "stride_xm", "stride_ym", "k_chunk", "M_BUCKET"], "i32")
int4 = dict(X="*bf16", QW="*u8", SCALES="*bf16", ZEROS="*bf16", BIAS="*bf16", Y="*bf16", PARTIAL="*fp32", **ints)
for block_m, block_n, block_k in [(1, 64, 128), (16, 64, 128), (128, 128, 64)]:  # GEMV rows, GEMV dot, tiled
    build(int4_kernels._int4_matmul_kernel, int4, dict(GROUP_SIZE=128, HAS_ZEROS=True, HAS_BIAS=True,
          SPLIT=block_m == 1, PRECISION=None, UPCAST=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
          GROUP_M=8), 90)
for arch, fp8_dot in [(90, True), (80, False)]:
    fp8 = dict(X="*bf16", W="*fp8e4nv" if fp8_dot else "*u8", W_SCALE="*fp32", BIAS="*bf16", Y="*bf16",
               PARTIAL="*fp32", **ints)
    ptx = build(fp8_kernels._fp8_matmul_kernel.fn, fp8, dict(HAS_BIAS=True, SPLIT=False, FP8_DOT=fp8_dot,
                UPCAST=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8), arch, warps=8).asm["ptx"]
    assert ("wgmma" in ptx) == fp8_dot and "div.rn.f32" in ptx
for x_type, precision in [("*bf16", None), ("*fp32", "ieee")]:
    int8 = dict(X=x_type, QW="*i8", SCALES="*fp32", BIAS=x_type, Y=x_type, PARTIAL="*fp32", **ints)
    build(int8_kernels._int8_matmul_kernel.fn, int8, dict(HAS_BIAS=True, SPLIT=False, PRECISION=precision,
          UPCAST=False, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8), 90)
print("compiled")
"""


def test_gpu_variants_compile():
    # the interpreter runs none of the GPU-only branches (fp8 tensor cores, the bf16 fast path, the GPU configs'
    # tile shapes): compile them for Hopper and Ampere with the ptxas Triton ships, no GPU needed
    import os
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
