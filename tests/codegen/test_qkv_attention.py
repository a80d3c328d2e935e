"""`lmforge::qkv_attention`: its CPU kernel (cpu/attention.c) against the chain of ops it stands for."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen import cpu_gemv
from lmforge.codegen.qkv_attention import kernel_takes, qkv_attention, reference
from tests.codegen.test_attention_kernels import reference64

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C compiler for the CPU kernels")


def case(B=2, Hq=6, Hkv=2, L=29, D=16, Dv=None, dtype=torch.float32, rotate=True, per_row_cos=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    rand = lambda *s: (torch.randn(*s, generator=gen) + 0.2).to(dtype)  # noqa: E731
    qkv = rand(B, 1, Hq * D + Hkv * D + Hkv * Dv)
    cos = sin = None
    if rotate:
        angle = torch.rand(B if per_row_cos else 1, 1, 1, D, generator=gen) * 6
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    k_buf, v_buf = rand(B, Hkv, L + 4, D), rand(B, Hkv, L + 4, Dv)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, : L // 2] = 0
    return qkv, cos, sin, k_buf, v_buf, mask, (Hq, Hkv, D, Dv)


def run_both(qkv, cos, sin, k_buf, v_buf, mask, heads, scale=0.3, window=0):
    """The kernel and the reference on copies of the same caches: (outputs, caches after each)."""
    L = mask.shape[1]
    results = []
    for fn in ("kernel", "reference"):
        kb, vb = k_buf.clone(), v_buf.clone()
        kc, vc = kb[:, :, :L], vb[:, :, :L]
        if fn == "kernel":
            assert kernel_takes(qkv, cos, sin, kc, vc, mask, True, *heads)
            out = cpu_gemv.kernel().qkv_attention(qkv, cos, sin, kc, vc, mask, *heads, scale, window)
        else:
            out = reference(qkv, cos, sin, kc, vc, mask, *heads, scale, True, window)
        results.append((out, kb, vb))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,L,D,Dv,rotate,per_row_cos", [
    (1, 9, 3, 33, 64, 64, True, False),    # SmolLM's heads
    (2, 6, 2, 29, 24, 24, True, True),     # GQA, cos per row (left-padded batches have their own positions)
    (3, 4, 4, 17, 18, 18, True, False),    # MHA, a head dim that is not a multiple of 16
    (2, 8, 1, 40, 16, 32, False, False),   # MQA, no rotary (GPT-2's form), value head dim unlike the key's
    (1, 2, 1, 1, 16, 16, True, False),     # the first token
])
def test_matches_the_ops_it_replaces(dtype, B, Hq, Hkv, L, D, Dv, rotate, per_row_cos):
    (out, kb, vb), (want, want_kb, want_vb) = run_both(*case(B, Hq, Hkv, L, D, Dv, dtype, rotate, per_row_cos))
    # the rotated key and the value land in slot L - 1 exactly as the ops put them, nothing else moves
    assert torch.equal(kb, want_kb) and torch.equal(vb, want_vb)
    assert out.shape == want.shape == (B, 1, Hq * Dv) and out.dtype == dtype
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=tol * max(1.0, want.abs().max().item()))


def test_against_float64():
    """The kernel's attention over its own cache writes, against float64."""
    qkv, cos, sin, k_buf, v_buf, mask, heads = case(B=2, Hq=6, Hkv=3, L=21, D=32, dtype=torch.bfloat16)
    Hq, Hkv, D, Dv = heads
    L = mask.shape[1]
    out = cpu_gemv.kernel().qkv_attention(qkv, cos, sin, k_buf[:, :, :L], v_buf[:, :, :L], mask, *heads, 0.25, 0)
    from lmforge.codegen.rotary import reference as rotary
    q = rotary(qkv[..., : Hq * D].view(2, 1, Hq, D).transpose(1, 2), cos, sin)  # the op's rounding
    want = reference64(q, k_buf[:, :, :L], v_buf[:, :, :L], mask, 0.25, True, 0).transpose(1, 2).reshape(2, 1, -1)
    assert (out.double() - want).abs().max() <= 8e-3 * want.abs().max()


@pytest.mark.parametrize("window", [1, 6, 40])
def test_sliding_window(window):
    (out, kb, vb), (want, want_kb, _) = run_both(*case(L=29, dtype=torch.bfloat16), window=window)
    assert torch.equal(kb, want_kb)
    torch.testing.assert_close(out.float(), want.float(), rtol=0, atol=2e-2)


def test_the_op_prefills_through_the_ops_and_decodes_through_the_kernel():
    qkv, cos, sin, k_buf, v_buf, mask, heads = case(B=2, L=12, dtype=torch.float32)
    L = mask.shape[1]
    prompt = torch.randn(2, 5, qkv.shape[-1])
    angle = torch.rand(1, 1, 5, heads[2]) * 6
    kb, vb = k_buf.clone(), v_buf.clone()
    out = qkv_attention(prompt, angle.cos(), angle.sin(), kb[:, :, :L], vb[:, :, :L], mask, *heads, 0.3)
    want = reference(prompt, angle.cos(), angle.sin(), k_buf[:, :, :L], v_buf[:, :, :L], mask, *heads, 0.3)
    assert torch.equal(out, want) and torch.equal(kb, k_buf)
    out = qkv_attention(qkv, cos, sin, kb[:, :, :L], vb[:, :, :L], mask, *heads, 0.3)
    assert torch.equal(out, cpu_gemv.kernel().qkv_attention(qkv, cos, sin, k_buf[:, :, :L], v_buf[:, :, :L], mask,
                                                             *heads, 0.3, 0))


def test_what_the_kernel_refuses():
    qkv, cos, sin, k_buf, v_buf, mask, heads = case()
    kc, vc = k_buf[:, :, :29], v_buf[:, :, :29]
    ok = kernel_takes
    assert ok(qkv, cos, sin, kc, vc, mask, True, *heads)
    assert not ok(qkv, cos, sin, kc, vc, mask, False, *heads)
    assert not ok(torch.cat([qkv, qkv], 1), cos, sin, kc, vc, mask, True, *heads)  # two new tokens
    assert not ok(qkv.bfloat16(), cos, sin, kc, vc, mask, True, *heads)
    assert not ok(qkv, cos, None, kc, vc, mask, True, *heads)
    assert not ok(qkv, cos.expand(1, 1, 2, 16), sin.expand(1, 1, 2, 16), kc, vc, mask, True, *heads)
    Hq, Hkv, D, Dv = heads
    assert not ok(qkv, cos, sin, kc, vc, mask, True, Hq + 1, Hkv, D, Dv)  # sizes that do not add up
    assert not ok(qkv[..., :-1], cos, sin, kc, vc, mask, True, *heads)
    assert not ok(qkv, cos, sin, kc[:1], vc[:1], mask, True, *heads)  # caches of another batch
