"""The static KV cache (`runtime/kv_cache.py`): one buffer per layer and per K/V, allocated once; a step's
views are windows onto those buffers, so a write through a view lands in the cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.graph import KVCacheSpec, KVLayerSpec
from lmforge.runtime.kv_cache import KVCache

# layers of different geometry on purpose (as a model with per-layer head counts or MLA-style k/v dims has)
SPEC = KVCacheSpec([KVLayerSpec(n_kv_heads=2, k_head_dim=16, v_head_dim=16),
                    KVLayerSpec(n_kv_heads=1, k_head_dim=24, v_head_dim=8)], dtype=torch.bfloat16)


def test_buffers_are_k_then_v_per_layer_with_each_layers_geometry():
    cache = KVCache(SPEC, batch=3, max_seq_len=10)
    assert [tuple(b.shape) for b in cache.buffers] == [(3, 2, 10, 16), (3, 2, 10, 16), (3, 1, 10, 24), (3, 1, 10, 8)]
    assert all(b.dtype == torch.bfloat16 and b.device.type == "cpu" for b in cache.buffers)
    assert all(not b.any() for b in cache.buffers)  # an empty cache holds zeros, never stale memory
    assert len({b.data_ptr() for b in cache.buffers}) == 4  # no two share storage
    assert (cache.batch, cache.max_seq_len) == (3, 10)


def test_nbytes_is_batch_times_length_times_the_specs_bytes_per_token():
    cache = KVCache(SPEC, batch=3, max_seq_len=10)
    per_token = 2 * (16 + 16) * 2 + 1 * (24 + 8) * 2  # heads * (k + v) * bf16, for each layer
    assert SPEC.bytes_per_token() == per_token
    assert cache.nbytes() == 3 * 10 * per_token
    float_spec = KVCacheSpec(SPEC.layers, torch.float32)
    assert KVCache(float_spec, batch=1, max_seq_len=4).nbytes() == 4 * 2 * per_token


@pytest.mark.parametrize("length", [0, 1, 7, 10])
def test_views_cut_every_buffer_to_length_without_copying(length):
    cache = KVCache(SPEC, batch=2, max_seq_len=10)
    views = cache.views(length)
    assert [tuple(v.shape) for v in views] == [(2, 2, length, 16), (2, 2, length, 16), (2, 1, length, 24), (2, 1, length, 8)]
    for view, buffer in zip(views, cache.buffers):
        assert view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_a_step_writing_its_last_slots_through_the_views_fills_the_cache():
    """What the graph does: write the new tokens' keys into the last `seq` slots of views(past + seq)."""
    cache = KVCache(SPEC, batch=2, max_seq_len=10)
    gen = torch.Generator().manual_seed(0)
    written = []
    past = 0
    for seq in (4, 1, 1):  # a prefill of 4 tokens, then two decode steps
        views = cache.views(past + seq)
        new = [torch.randn(v.shape[0], v.shape[1], seq, v.shape[3], generator=gen).to(v.dtype) for v in views]
        slots = torch.arange(past, past + seq)
        for v, x in zip(views, new):
            v.index_copy_(2, slots, x)
        written.append(new)
        past += seq
    for i, buffer in enumerate(cache.buffers):
        expected = torch.cat([step[i] for step in written], dim=2)
        assert torch.equal(buffer[:, :, :past], expected)
        assert not buffer[:, :, past:].any()  # slots not reached yet are untouched


def test_meta_device_allocates_nothing():
    cache = KVCache(SPEC, batch=64, max_seq_len=1 << 16, device="meta")
    assert all(b.device.type == "meta" for b in cache.buffers)
    assert cache.nbytes() == 64 * (1 << 16) * SPEC.bytes_per_token()


def test_a_model_without_attention_layers_has_an_empty_cache():
    cache = KVCache(KVCacheSpec([], torch.float32), batch=1, max_seq_len=8)
    assert cache.buffers == [] and cache.views(3) == [] and cache.nbytes() == 0
