"""`cpu/attention.c`: decode attention (cache append + attend) against the op's float64 semantics."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.attention import attention, reference
from tests.codegen.test_attention_kernels import reference64

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler for the CPU kernels")
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3}  # the output's own rounding, relative to its largest value


def case(B=2, Hq=6, Hkv=2, L=37, D=24, Dv=None, dtype=torch.float32, seed=0, slack=3):
    """Random (never zero) q, k, v, cache buffers with `slack` slots past the L the op sees, a padded mask."""
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    rand = lambda *s: (torch.randn(*s, generator=gen) + 0.2).to(dtype)  # noqa: E731
    q, k, v = rand(B, Hq, 1, D), rand(B, Hkv, 1, D), rand(B, Hkv, 1, Dv)
    k_buf, v_buf = rand(B, Hkv, L + slack, D), rand(B, Hkv, L + slack, Dv)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, : L // 3] = 0  # row 0 left-padded
    if B > 2:
        mask[2, 1::2] = 0  # holes, not only a prefix
        mask[2, L - 1] = 1
    return q, k, v, k_buf, v_buf, mask


def check(q, k, v, k_buf, v_buf, mask, scale=0.3, window=0):
    L = mask.shape[1]
    before_k, before_v = k_buf.clone(), v_buf.clone()
    kc, vc = k_buf[:, :, :L], v_buf[:, :, :L]
    assert cpu_gemv.supports_attention(q, k, v, kc, vc, mask, True)
    out = cpu_gemv.kernel().attention(q, k, v, kc, vc, mask, scale, window)
    # the new token's key and value land in slot L - 1 and nothing else in the buffers moves
    assert torch.equal(k_buf[:, :, L - 1], k[:, :, 0]) and torch.equal(v_buf[:, :, L - 1], v[:, :, 0])
    for buf, old in ((k_buf, before_k), (v_buf, before_v)):
        assert torch.equal(buf[:, :, : L - 1], old[:, :, : L - 1]) and torch.equal(buf[:, :, L:], old[:, :, L:])
    want = reference64(q, kc, vc, mask, scale, True, window)
    err = (out.double() - want).abs().max().item()
    assert err <= TOL[q.dtype] * max(1.0, want.abs().max().item()), err
    assert out.transpose(1, 2).is_contiguous()  # laid out as SDPA's output
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L,D,Dv", [
    (1, 9, 3, 33, 64, 64),     # SmolLM's heads
    (2, 6, 2, 37, 24, 24),     # GQA, a head dim that is not a multiple of 16
    (3, 4, 4, 19, 17, 17),     # MHA, odd head dim, a mask with holes
    (2, 8, 1, 50, 32, 48),     # MQA, value head dim unlike the key's
    (1, 2, 1, 1, 16, 16),      # the first token: one key
])
def test_matches_float64(dtype, B, Hq, Hkv, L, D, Dv):
    check(*case(B, Hq, Hkv, L, D, Dv, dtype))


@pytest.mark.parametrize("window", [1, 5, 36, 80])
def test_sliding_window(window):
    check(*case(B=3, L=37, dtype=torch.bfloat16), window=window)


def test_many_threads_and_long_caches():
    """Big enough to run in parallel, and longer than the scores' stack buffer (4096 keys)."""
    check(*case(B=2, Hq=4, Hkv=2, L=4100, D=16))
    check(*case(B=1, Hq=14, Hkv=2, L=300, D=64, dtype=torch.bfloat16))


def test_strided_queries_and_values():
    """q as a transposed (B, S, H, D) projection (GPT-2's layout), k and v slices of one fused projection."""
    B, Hq, L, D = 2, 4, 21, 16
    q, k, v, k_buf, v_buf, mask = case(B, Hq, Hq, L, D)
    qkv = torch.randn(B, 1, 3 * Hq * D) + 0.2
    q = qkv[..., : Hq * D].view(B, 1, Hq, D).transpose(1, 2)
    k = qkv[..., Hq * D: 2 * Hq * D].view(B, 1, Hq, D).transpose(1, 2)
    v = qkv[..., 2 * Hq * D:].view(B, 1, Hq, D).transpose(1, 2)
    check(q, k, v, k_buf, v_buf, mask)


def test_a_row_that_sees_nothing_gets_zeros():
    q, k, v, k_buf, v_buf, mask = case(B=2, L=9)
    mask[1] = 0
    out = cpu_gemv.kernel().attention(q, k, v, k_buf[:, :, :9], v_buf[:, :, :9], mask, 0.5, 0)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0


def test_the_op_runs_the_kernel_and_agrees_with_sdpa(monkeypatch):
    """`lmforge::attention` on a decode call takes the kernel (its result differs from the SDPA reference in
    the last bits), and LMFORGE_CPU_KERNELS=0 gives the reference exactly."""
    q, k, v, k_buf, v_buf, mask = case(B=2, L=40, D=64, dtype=torch.bfloat16)
    kc, vc = k_buf[:, :, :40], v_buf[:, :, :40]
    out = attention(q, k, v, kc, vc, mask, 0.125, True, 0)
    sdpa = reference(q, kc, vc, mask, 0.125)
    torch.testing.assert_close(out.float(), sdpa.float(), rtol=0, atol=2e-2)
    assert torch.equal(out, cpu_gemv.kernel().attention(q, k, v, kc, vc, mask, 0.125, 0))
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    cpu_gemv.kernel.cache_clear()
    try:
        assert torch.equal(attention(q, k, v, kc, vc, mask, 0.125, True, 0), sdpa)
    finally:
        monkeypatch.undo()
        cpu_gemv.kernel.cache_clear()


def test_what_the_kernel_refuses():
    q, k, v, k_buf, v_buf, mask = case()
    kc, vc = k_buf[:, :, :37], v_buf[:, :, :37]
    ok = cpu_gemv.supports_attention
    assert ok(q, k, v, kc, vc, mask, True)
    assert not ok(q, k, v, kc, vc, mask, False)  # not causal
    assert not ok(q.half(), k.half(), v.half(), kc.half(), vc.half(), mask, True)
    assert not ok(q.bfloat16(), k, v, kc, vc, mask, True)  # mixed dtypes
    assert not ok(q, k, v, kc, vc, mask.int(), True)
    assert not ok(torch.cat([q, q], 2), torch.cat([k, k], 2), v, kc, vc, mask, True)  # prefill
    assert not ok(q[:, :5], k, v, kc, vc, mask, True)  # query heads not a multiple of the kv heads
    assert not ok(q, k, v, kc[:1], vc[:1], mask, True)  # caches of another batch
    assert not ok(q, k[..., :-1], v, kc, vc, mask, True)
