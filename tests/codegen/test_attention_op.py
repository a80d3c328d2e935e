"""`lmforge::attention`: cache append + attention in one op, on both paths, through torch.library."""

from __future__ import annotations

import pytest
import torch

from lmforge.codegen.attention import attention, reference
from lmforge.codegen.dispatch import kernel_mode
from tests.codegen.test_attention_kernels import TOL, reference64


def inputs(B=2, H=4, Hkv=2, S=3, L=11, D=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: (torch.randn(*s, generator=gen) + 0.1).to(dtype)  # noqa: E731
    q, k, v = rand(B, H, S, D), rand(B, Hkv, S, D), rand(B, Hkv, S, D)
    k_buf, v_buf = rand(B, Hkv, L + 5, D), rand(B, Hkv, L + 5, D)  # static buffers; the op sees views
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :4] = 0
    return q, k, v, k_buf, v_buf, mask


@pytest.mark.parametrize("mode", ["torch", "triton"])
@pytest.mark.parametrize("S,window", [(3, 0), (1, 0), (11, 0), (4, 5), (1, 4)])
def test_op_appends_and_attends(monkeypatch, mode, S, window):
    monkeypatch.setenv("LMFORGE_KERNELS", mode)
    q, k, v, k_buf, v_buf, mask = inputs(S=S)
    L = mask.shape[1]
    k_before, v_before = k_buf.clone(), v_buf.clone()
    out = attention(q, k, v, k_buf[:, :, :L], v_buf[:, :, :L], mask, 0.3, True, window)
    # the new keys/values land in the last S slots of the views, nothing else in the buffers moves
    assert torch.equal(k_buf[:, :, L - S:L], k) and torch.equal(v_buf[:, :, L - S:L], v)
    assert torch.equal(k_buf[:, :, : L - S], k_before[:, :, : L - S])
    assert torch.equal(k_buf[:, :, L:], k_before[:, :, L:])
    assert torch.equal(v_buf[:, :, : L - S], v_before[:, :, : L - S])
    want = reference64(q, k_buf[:, :, :L], v_buf[:, :, :L], mask, 0.3, True, window)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=TOL[torch.float32] * 10)
    # laid out like SDPA's output, so the usual transpose(1, 2).view(B, S, H * D) works
    assert out.transpose(1, 2).is_contiguous()


def test_paths_agree_in_bfloat16(monkeypatch):
    outs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("LMFORGE_KERNELS", mode)
        q, k, v, k_buf, v_buf, mask = inputs(S=5, L=13, dtype=torch.bfloat16)
        outs[mode] = attention(q, k, v, k_buf[:, :, :13], v_buf[:, :, :13], mask, 0.25, True, 0).float()
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=0, atol=2e-2)


def test_fake_tensor_shape_and_export():
    class Layer(torch.nn.Module):
        def forward(self, q, k, v, kc, vc, mask):
            return attention(q, k, v, kc, vc, mask, 0.25, True, 0) * 2

    args = inputs()[:5] + (inputs()[5],)
    args = (*args[:3], args[3][:, :, :11].contiguous(), args[4][:, :, :11].contiguous(), args[5])
    ep = torch.export.export(Layer(), args)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert any("lmforge.attention" in op for op in ops)
    compiled = torch.compile(Layer(), backend="eager", fullgraph=True)
    a1 = tuple(x.clone() for x in args)
    a2 = tuple(x.clone() for x in args)
    torch.testing.assert_close(compiled(*a1), Layer()(*a2))
    assert torch.equal(a1[3], a2[3])  # the compiled op wrote the cache as well


def test_kernel_mode_is_checked(monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="LMFORGE_KERNELS"):
        kernel_mode()
    monkeypatch.setenv("LMFORGE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, k_buf, v_buf, mask = inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        attention(q, k, v, k_buf[:, :, :11], v_buf[:, :, :11], mask, 0.25, True, 0)


def test_reference_matches_float64_with_gqa_folding():
    # the reference folds query groups into the sequence dim; it must still equal per-head attention
    q, _, _, k_buf, v_buf, mask = inputs(H=6, Hkv=2, S=4, L=9)
    out = reference(q, k_buf[:, :, :9], v_buf[:, :, :9], mask, 0.2, True, 3)
    torch.testing.assert_close(out.double(), reference64(q, k_buf[:, :, :9], v_buf[:, :, :9], mask, 0.2, True, 3),
                               rtol=0, atol=1e-5)
