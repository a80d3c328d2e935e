"""The Triton attention kernels against a float64 reference, under TRITON_INTERPRET=1 on the CPU.

Random inputs (never zeros), odd lengths, every mask kind (causal, sliding window, padding, none) and
GQA ratios from MHA to MQA. Shapes are small: the interpreter runs every program in NumPy.
"""

from __future__ import annotations

import math

import pytest
import torch

kernels = pytest.importorskip("lmforge.codegen.kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def reference64(q, k, v, mask, scale, causal, window):
    """The op's semantics written out in float64, with K/V repeated per query head."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, S, D = q.shape
    L = k.shape[2]
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    keys = torch.arange(L)
    slots = torch.arange(L - S, L)[:, None]
    visible = mask.bool()[:, None, None, :].expand(B, 1, S, L)
    if causal:
        visible = visible & (keys <= slots)
        if window:
            visible = visible & (slots - keys < window)
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row that sees nothing: zeros
    return probs @ v


def make(B, H, Hkv, S, L, D, DV, dtype, pad=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: (torch.randn(*shape, generator=gen) + 0.1).to(dtype).to(DEVICE)  # noqa: E731
    q = rand(B, H, S, D)
    # the caches are views of longer buffers, as the runtime passes them
    k = rand(B, Hkv, L + 7, D)[:, :, :L]
    v = rand(B, Hkv, L + 7, DV)[:, :, :L]
    mask = torch.ones(B, L, dtype=torch.long)
    if pad is not None:
        for b, p in enumerate(pad):
            mask[b, :p] = 0
    return q, k, v, mask.to(DEVICE)


def check(out, q, k, v, mask, scale, causal, window):
    want = reference64(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), scale, causal, window)
    err = (out.cpu().double() - want).abs().max().item()
    assert err <= TOL[q.dtype] * max(1.0, want.abs().max().item()), err
    assert torch.isfinite(out).all()


# (B, Hq, Hkv, S, L): MHA, GQA 2 and 4, MQA; prompts with past, odd tails, more than one block each way
PREFILL_SHAPES = [(1, 2, 2, 19, 19), (2, 4, 2, 17, 33), (1, 8, 2, 33, 40), (2, 4, 1, 21, 21), (1, 3, 1, 5, 50)]


@pytest.mark.parametrize("shape", PREFILL_SHAPES)
@pytest.mark.parametrize("mask_kind", ["causal", "window", "padding", "none"])
def test_prefill_masks_and_gqa(shape, mask_kind):
    B, H, Hkv, S, L = shape
    pad = [3, 0][:B] if mask_kind == "padding" else None
    q, k, v, mask = make(B, H, Hkv, S, L, 16, 16, torch.float32, pad)
    causal, window = mask_kind != "none", 6 if mask_kind == "window" else 0
    scale = 1 / math.sqrt(16)
    out = kernels.prefill(q, k, v, mask, scale, causal, window)
    check(out, q, k, v, mask, scale, causal, window)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_head_dims_and_half_dtypes(head_dim, dtype):
    q, k, v, mask = make(1, 2, 1, 18, 23, head_dim, head_dim, dtype, pad=[2])
    scale = 1 / math.sqrt(head_dim)
    check(kernels.prefill(q, k, v, mask, scale, True, 0), q, k, v, mask, scale, True, 0)


# (B, Hq, Hkv, S, L): one query and a few (speculative), per-row padding, long-ish caches
DECODE_SHAPES = [(1, 4, 4, 1, 37), (3, 4, 2, 1, 70), (2, 8, 2, 3, 45), (2, 4, 1, 1, 129), (1, 2, 1, 5, 9)]


@pytest.mark.parametrize("shape", DECODE_SHAPES)
@pytest.mark.parametrize("mask_kind", ["causal", "window", "padding"])
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_masks_gqa_and_splits(shape, mask_kind, splits):
    B, H, Hkv, S, L = shape
    pad = [min(5, L - S), 0, 2][:B] if mask_kind == "padding" else None  # each row its own length
    q, k, v, mask = make(B, H, Hkv, S, L, 32, 32, torch.float32, pad)
    window = 7 if mask_kind == "window" else 0
    out = kernels.decode(q, k, v, mask, 0.3, True, window, n_splits=splits)
    check(out, q, k, v, mask, 0.3, True, window)


@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_head_dims_and_half_dtypes(head_dim, dtype):
    q, k, v, mask = make(2, 4, 2, 1, 41, head_dim, head_dim, dtype, pad=[0, 4])
    scale = 1 / math.sqrt(head_dim)
    check(kernels.decode(q, k, v, mask, scale, True, 0, n_splits=2), q, k, v, mask, scale, True, 0)


def test_kernel_choice_by_shape():
    q, k, v, mask = make(1, 4, 2, 1, 20, 16, 16, torch.float32)
    assert torch.equal(kernels.attention(q, k, v, mask, 0.25), kernels.decode(q, k, v, mask, 0.25))
    q, k, v, mask = make(1, 4, 2, 20, 20, 16, 16, torch.float32)
    assert torch.equal(kernels.attention(q, k, v, mask, 0.25), kernels.prefill(q, k, v, mask, 0.25))


def test_fully_padded_query_rows_are_zero():
    # a left-padded prompt: its first query slots see no key at all; FlashAttention convention gives zeros
    q, k, v, mask = make(1, 2, 2, 6, 6, 16, 16, torch.float32, pad=[4])
    out = kernels.prefill(q, k, v, mask, 0.25, True, 0)
    assert out[0, :, :4].abs().max() == 0
    check(out, q, k, v, mask, 0.25, True, 0)


def test_bad_shapes_are_named():
    q, k, v, mask = make(1, 3, 2, 1, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.decode(q, k, v, mask, 0.25)
    q, k, v, mask = make(1, 2, 2, 1, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="attention_mask"):
        kernels.decode(q, k, v, mask[:, :5], 0.25)
