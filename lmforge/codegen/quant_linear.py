"""The quantized linear ops that the `quantize` pass puts in place of linear layers.

    int4_linear(x, qweight, scales, zeros, group_size, bias=None) -> y
        x (..., K) float;  qweight (N, K // 2) uint8;  scales, zeros (N, K // G) float (zeros may be None:
        every zero point 8);  bias (N,) or None;  y (..., N) in x's dtype.
        W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G], q packed as in `quant/int4.py`.
    fp8_linear(x, weight, weight_scale, bias=None) -> y
        weight (N, K) float8_e4m3fn;  weight_scale (N,) float32;  x quantized per row at run time
        (`quant/fp8.py`); y (..., N) in x's dtype.
    int8_linear(x, qweight, scales, bias=None) -> y
        qweight (N, K) int8;  scales (N,) float32;  W[n, k] = qweight[n, k] * scales[n] (`quant/int8.py`);
        x as it is (weight-only); y (..., N) in x's dtype.

Implementations, by device and `LMFORGE_KERNELS` (`codegen/dispatch.py`):
- reference (PyTorch, any device): dequantize the weight and multiply in float32 (fp8: on the quantized
  activations, so the numbers are exactly the kernels' up to summation order);
- CPU: int4 through lmforge's C kernel (`cpu_gemv.Kernel.int4`), with scales and zeros in float32 or bfloat16
  (`_prepare_int4` widens others at load); int8 through `cpu_gemv.Kernel.int8`; calls of either with many rows
  of x (prefill) by the way `cpu_route.py` measures fastest (AMX tiles, or PyTorch's matmul on dequantized
  chunks of the weight, or those kernels); fp8 through the reference;
- CUDA: int4 and int8 through the Triton kernels (`codegen/kernels/int4.py`, `int8.py`); fp8 through `torch._scaled_mm` with
  row-wise scales where the GPU has fp8 tensor cores (compute capability 8.9+), else the Triton kernel.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from lmforge.codegen import cpu_gemv, cpu_route
from lmforge.codegen.dispatch import use_triton
from lmforge.ir.ops import Casts, OpFacts, register_op
from lmforge.ir.spec import spec_of
from lmforge.ir.verify import same_float_dtype
from lmforge.quant import fp8 as fp8_math
from lmforge.quant import handler
from lmforge.quant import int4 as int4_math
from lmforge.quant import int8 as int8_math

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("int4_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, "
            "Tensor? bias=None) -> Tensor")
_lib.define("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None) -> Tensor")
_lib.define("int8_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? bias=None) -> Tensor")


# --- references ------------------------------------------------------------------------------------


def int4_reference(x, qweight, scales, zeros, group_size: int, bias=None):
    w = int4_math.dequantize(int4_math.Int4Weight(qweight, scales, zeros, group_size))
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


def fp8_reference(x, weight, weight_scale, bias=None):
    xq, x_scale = fp8_math.quantize_rows(x)
    y = F.linear(xq.float(), weight.float()) * x_scale * weight_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_reference(x, qweight, scales, bias=None):
    w = int8_math.dequantize(int8_math.Int8Weight(qweight, scales))
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)


# --- implementations ---------------------------------------------------------------------------------


def int4_linear_impl(x, qweight, scales, zeros, group_size: int, bias=None):
    if use_triton(x):
        from lmforge.codegen.kernels import int4 as kernels

        y = kernels.int4_matmul(x.reshape(-1, x.shape[-1]), qweight, scales, zeros, group_size, bias)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    if x.device.type == "cpu":
        kernel = cpu_gemv.kernel()
        if kernel is not None and cpu_gemv.supports_int4(x, qweight, scales, zeros, group_size, bias):
            y = cpu_route.int4_linear(kernel, x, qweight, scales, zeros, group_size, bias)
            return kernel.int4(x, qweight, scales, zeros, group_size, bias) if y is None else y
    return int4_reference(x, qweight, scales, zeros, group_size, bias)


def _record_int4(b, x, qweight, scales, zeros, group_size: int, bias=None):
    """The int4 kernel `int4_linear_impl` calls on the CPU, for a step program (`cpu_program.py`)."""
    rows = b.rows(x)
    if rows is None or not cpu_gemv.supports_int4(x, qweight, scales, zeros, group_size, bias):
        return None
    (M, ldx), N, K = rows, qweight.shape[0], qweight.shape[1] * 2
    y = b.out((*x.shape[:-1], N), x.dtype)
    if cpu_route.choose(b.kernel, "int4", x) == "amx":
        b.call("amx", (x, qweight, scales, zeros, bias, y),
               (cpu_gemv.AMX_INT4, ldx, scales.dtype == torch.bfloat16, group_size, N, M, N, K, b.threads))
        return y
    kind = "int4_q8" if b.kernel.int4_q8_for(M) else "int4"
    b.call(kind, (x, qweight, scales, zeros, bias, y),
           (ldx, x.dtype == torch.float32, N, M, N, K, group_size, b.threads, scales.dtype == torch.bfloat16))
    return y


def int8_linear_impl(x, qweight, scales, bias=None):
    if use_triton(x):
        from lmforge.codegen.kernels import int8 as kernels

        y = kernels.int8_matmul(x.reshape(-1, x.shape[-1]), qweight, scales, bias)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    if x.device.type == "cpu":
        kernel = cpu_gemv.kernel()
        if kernel is not None and cpu_gemv.supports_int8(x, qweight, scales, bias):
            y = cpu_route.int8_linear(kernel, x, qweight, scales, bias)
            return kernel.int8(x, qweight, scales, bias) if y is None else y
    return int8_reference(x, qweight, scales, bias)


def _record_int8(b, x, qweight, scales, bias=None):
    """The int8 kernel `int8_linear_impl` calls on the CPU, for a step program (`cpu_program.py`)."""
    rows = b.rows(x)
    if rows is None or not cpu_gemv.supports_int8(x, qweight, scales, bias):
        return None
    (M, ldx), (N, K) = rows, qweight.shape
    y = b.out((*x.shape[:-1], N), x.dtype)
    if cpu_route.choose(b.kernel, "int8", x) == "amx":
        b.call("amx", (x, qweight, scales, None, bias, y), (cpu_gemv.AMX_INT8, ldx, 0, 0, N, M, N, K, b.threads))
        return y
    b.call("int8", (x, qweight, scales, bias, y), (ldx, x.dtype == torch.float32, N, M, N, K, b.threads))
    return y


def fp8_linear_impl(x, weight, weight_scale, bias=None):
    if x.device.type == "cuda" and _scaled_mm_ok(x, weight):
        return _fp8_scaled_mm(x, weight, weight_scale, bias)
    if use_triton(x):
        from lmforge.codegen.kernels import fp8 as kernels

        y = kernels.fp8_matmul(x.reshape(-1, x.shape[-1]), weight, weight_scale, bias)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return fp8_reference(x, weight, weight_scale, bias)


def _scaled_mm_ok(x, weight) -> bool:  # pragma: no cover - GPU only
    if x.dtype not in (torch.bfloat16, torch.float16) or torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    N, K = weight.shape
    return K % 16 == 0 and N % 16 == 0


def _fp8_scaled_mm(x, weight, weight_scale, bias):  # pragma: no cover - GPU only
    x2 = x.reshape(-1, x.shape[-1])
    xq, x_scale = fp8_math.quantize_rows(x2)
    y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.float()[None, :],
                         bias=None if bias is None else bias.to(x.dtype), out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


for _device in ("CPU", "CUDA"):
    _lib.impl("int4_linear", int4_linear_impl, _device)
    _lib.impl("fp8_linear", fp8_linear_impl, _device)
    _lib.impl("int8_linear", int8_linear_impl, _device)


@torch.library.register_fake("lmforge::int4_linear")
def _int4_fake(x, qweight, scales, zeros, group_size, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.register_fake("lmforge::fp8_linear")
def _fp8_fake(x, weight, weight_scale, bias=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lmforge::int8_linear")
def _int8_fake(x, qweight, scales, bias=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


int4_linear = torch.ops.lmforge.int4_linear.default
fp8_linear = torch.ops.lmforge.fp8_linear.default
int8_linear = torch.ops.lmforge.int8_linear.default


# --- what the IR's tools know of them --------------------------------------------------------------------


def _verify_int4(node) -> str | None:
    x, q, scales, zeros = (spec_of(a) for a in node.args[:4])
    group = node.args[4]
    if q is not None and (q.dtype != torch.uint8 or len(q.shape) != 2):
        return f"qweight is {q.dtype} of rank {len(q.shape)}, expected 2-D uint8"
    if q is not None and scales is not None and isinstance(q.shape[1], int):
        if tuple(scales.shape) != (q.shape[0], q.shape[1] * 2 // group):
            return f"scales {tuple(scales.shape)} do not fit qweight {tuple(q.shape)} with group size {group}"
        if zeros is not None and (zeros.shape, zeros.dtype) != (scales.shape, scales.dtype):
            return "zeros differ from scales in shape or dtype"
        if x is not None and x.shape[-1] != q.shape[1] * 2:
            return f"input has {x.shape[-1]} features, the weight {q.shape[1] * 2}"
    return same_float_dtype(0, 5)(node)


def _verify_fp8(node) -> str | None:
    w, scale = spec_of(node.args[1]), spec_of(node.args[2])
    if w is not None and w.dtype != torch.float8_e4m3fn:
        return f"weight is {w.dtype}, expected float8_e4m3fn"
    if scale is not None and (scale.dtype != torch.float32 or w is not None and tuple(scale.shape) != (w.shape[0],)):
        return f"weight_scale is {scale.dtype} {tuple(scale.shape)}, expected float32 (N,)"
    return same_float_dtype(0, 3)(node)


def _verify_int8(node) -> str | None:
    x, w, scale = (spec_of(a) for a in node.args[:3])
    if w is not None and (w.dtype != torch.int8 or len(w.shape) != 2):
        return f"qweight is {w.dtype} of rank {len(w.shape)}, expected 2-D int8"
    if scale is not None and (scale.dtype != torch.float32 or w is not None and tuple(scale.shape) != (w.shape[0],)):
        return f"scales are {scale.dtype} {tuple(scale.shape)}, expected float32 (N,)"
    if x is not None and w is not None and isinstance(w.shape[1], int) and x.shape[-1] != w.shape[1]:
        return f"input has {x.shape[-1]} features, the weight {w.shape[1]}"
    return same_float_dtype(0, 3)(node)


def _numel(node, i: int) -> int:
    shape = node.args[i].meta["spec"].shape
    return shape[0] * shape[1]


def _prepare_int4(ir, node, device) -> bool:
    """Give an int4 layer the layout its kernel on `device` reads.

    The artifact stores int4 scales and zero points in the compute dtype. lmforge's CPU kernel reads them as
    float32 or bfloat16 (`cpu_gemv.INT4_SCALE_DTYPES`: bfloat16 ones are half the bytes a decode step streams
    beside the codes), so for a CPU engine with that kernel other dtypes (float16) are widened to float32 once, at
    load (exactly: every float16 value is a float32 value), instead of on every call. The Triton kernels read the
    stored layout.
    """
    if device.type != "cpu" or not cpu_gemv.available() or node.args[2] is None:
        return False
    stored = ir.weight(node.args[2].target).dtype
    dtype = stored if stored in cpu_gemv.INT4_SCALE_DTYPES else torch.float32
    args = list(node.args)
    for i in (2, 3):  # scales, zeros
        get = args[i]
        if get is None or ir.weight(get.target).dtype == dtype:
            continue
        wide = f"{get.target}_{str(dtype).removeprefix('torch.')}"  # one copy however many layers read the tensor
        if not hasattr(ir.gm, wide):
            ir.set_weight(wide, ir.weight(get.target).to(dtype), source_name=ir.weight_names.get(get.target),
                          kind=ir.weight_kind(get.target))
        with ir.graph.inserting_before(node):
            args[i] = ir.graph.get_attr(wide)
        args[i].meta["spec"] = replace(get.meta["spec"], dtype=dtype)
    if args == list(node.args):
        return False
    node.args = tuple(args)
    return True


register_op(int4_linear, OpFacts(
    shard="linear", verify=("int4-linear", _verify_int4), cpu=int4_linear_impl, linear=handler("int4").linear_form,
    cost=lambda node: (4 * _numel(node, 1), 0),  # qweight (N, K // 2) holds N * K weights
    casts=Casts((0, 5), to=2),  # x and the bias in the scales' dtype
    params={1: 2, 2: 0, 3: 0},  # two 4-bit values a byte; scales and zero points count nothing
    prepare=_prepare_int4,
    record=_record_int4,
))
register_op(fp8_linear, OpFacts(
    shard="linear", verify=("fp8-linear", _verify_fp8), cpu=fp8_linear_impl,
    linear=handler("fp8").linear_form,
    cost=lambda node: (2 * _numel(node, 1), 0),
    casts=Casts((0, 3), "compute"),  # activations and bias in the compute dtype
    params={1: 1, 2: 0},
))
register_op(int8_linear, OpFacts(
    shard="linear", verify=("int8-linear", _verify_int8), cpu=int8_linear_impl, linear=handler("int8").linear_form,
    cost=lambda node: (2 * _numel(node, 1), 0),
    casts=Casts((0, 3), "compute"),  # activations and bias in the compute dtype; the scales stay float32
    params={1: 1, 2: 0},
    record=_record_int8,
))
