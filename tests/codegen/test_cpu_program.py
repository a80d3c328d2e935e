"""Step programs (`cpu_program.py`, `cpu/program.c`): recorded kernel calls give what the same calls made one at a
time give, bit for bit, on odd sizes, strided views and offsets into the scratch buffer."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv, cpu_program
from lmforge.codegen.add_rms_norm import _add_rms_norm_cpu
from lmforge.codegen.glu import glu_impl
from lmforge.codegen.linear import _linear_cpu
from lmforge.ir.ops import op_facts

pytestmark = pytest.mark.skipif(not cpu_program.available(), reason="no C compiler for the CPU kernels")
aten = torch.ops.aten


def record(fn, b, *args):
    return op_facts(fn).record(b, *args)


def randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("way", ["kernel", "amx"])
def test_a_recorded_mlp_is_the_eager_calls_exactly(dtype, rows, way, monkeypatch):
    """add + RMSNorm -> gate/up GEMV -> split -> GLU -> down GEMV, with sizes that line up with nothing; with the
    linears on AMX tiles (bfloat16, where the CPU has them) instead of the GEMV."""
    if way == "amx" and not (dtype == torch.bfloat16 and cpu_gemv.kernel().amx_available):
        pytest.skip("AMX takes bfloat16 on a CPU that has it")
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", way)
    K, F = 45, 37
    x, r = randn(1, rows, K, dtype=dtype, seed=1), randn(1, rows, K, dtype=dtype, seed=2)
    w_norm, w_up, w_down = randn(K, dtype=dtype, seed=3), randn(2 * F, K, dtype=dtype, seed=4), randn(K, F, dtype=dtype, seed=5)
    bias = randn(K, dtype=dtype, seed=6)

    y, s = _add_rms_norm_cpu(x, r, w_norm, 1e-5, dtype)
    gate, up = _linear_cpu(y, w_up).split([F, F], -1)
    want = (_linear_cpu(glu_impl(gate, up, "silu"), w_down, bias), s)

    b = cpu_program.Builder()
    xr, rr = b.input(x), b.input(r)
    yr, sr = record(_add_rms_norm_cpu, b, xr, rr, b.constant(w_norm), 1e-5, dtype)
    g, u = cpu_program.view(aten.split_with_sizes.default, record(_linear_cpu, b, yr, b.constant(w_up)), [F, F], -1)
    assert u.offset == g.offset + F * u.element_size() and u.stride() == g.stride()  # the second half, same rows
    h = record(glu_impl, b, g, u, "silu")
    out = record(_linear_cpu, b, h, b.constant(w_down), b.constant(bias))
    program = b.finish([out, sr])
    matmul = "amx" if way == "amx" else f"gemv_{'bf16' if dtype == torch.bfloat16 else 'f32'}"
    assert program.kinds == ["add_rms_norm", matmul, f"glu_silu_{'bf16' if dtype == torch.bfloat16 else 'f32'}",
                             matmul]
    got = program([x, r])
    assert all(torch.equal(g_, w_) for g_, w_ in zip(got, want))
    # the outputs are copies: a second call with other inputs leaves the first results alone
    first = [t.clone() for t in got]
    program([r, x])
    assert all(torch.equal(a, c) for a, c in zip(got, first))


def test_rows_of_a_view():
    b = cpu_program.Builder()
    ref = b.input(torch.empty(2, 3, 10))
    assert b.rows(ref) == (6, 10)
    assert b.rows(cpu_program.view(aten.slice.Tensor, ref, 2, 0, 4)) == (6, 10)  # rows of 4, 10 apart
    assert b.rows(cpu_program.view(aten.transpose.int, ref, 0, 1)) is None  # rows out of order
    assert b.rows(cpu_program.view(aten.transpose.int, ref, 1, 2)) is None  # columns not contiguous
    assert b.rows(cpu_program.view(aten.select.int, ref, 1, 2)) == (2, 30)


def test_what_a_recorder_declines():
    b = cpu_program.Builder()
    x = b.input(torch.empty(1, cpu_gemv.MAX_ROWS + 1, 16, dtype=torch.bfloat16))
    w = b.constant(torch.empty(8, 16, dtype=torch.bfloat16))
    assert record(_linear_cpu, b, x, w) is None  # more rows than the GEMV takes
    assert record(glu_impl, b, w, w, "gelu") is None  # exact GELU: no kernel
    assert b.finish([]) is None  # nothing recorded


def test_a_failing_call_names_its_op():
    b = cpu_program.Builder()
    x = b.input(torch.empty(1, 16, dtype=torch.bfloat16))
    w = b.constant(torch.ones(8, 16, dtype=torch.bfloat16))
    y = b.out((1, 8), torch.bfloat16)
    b.call("gemv_bf16", (x, w, None, y), (16, 8, cpu_gemv.MAX_ROWS + 1, 8, 16, 1))  # M past the kernel's rows
    program = b.finish([y])
    with pytest.raises(RuntimeError, match=r"op 0 \(gemv_bf16\) returned -1"):
        program([torch.ones(1, 16, dtype=torch.bfloat16)])


def test_an_output_must_be_the_programs_own():
    b = cpu_program.Builder()
    x = b.input(torch.ones(1, 16))
    w = b.constant(torch.ones(8, 16))
    record(_linear_cpu, b, x, w)
    assert b.finish([x]) is None  # an input passed through: not in the scratch buffer


def test_timed_adds_each_ops_seconds():
    b = cpu_program.Builder()
    x = b.input(torch.ones(1, 64))
    y = record(_linear_cpu, b, x, b.constant(torch.ones(32, 64)))
    program = b.finish([y])
    program.timed()
    program([torch.ones(1, 64)])
    program([torch.ones(1, 64)])
    assert len(program.seconds) == 1 and program.seconds[0] > 0
    program.timed(False)
    assert program.seconds is None
