"""The static KV cache the runtime owns and hands to the graph.

One pair of buffers per attention layer, allocated once per (batch, max_seq_len):

    k[i]: (batch, n_kv_heads_i, max_seq_len, k_head_dim_i)
    v[i]: (batch, n_kv_heads_i, max_seq_len, v_head_dim_i)

A step passes `views(length)`: each buffer cut to its first `length` slots (past + new tokens). The
graph writes the new tokens' keys and values into the last slots of those views in place, so the cache
never moves or grows.
"""

from __future__ import annotations

import torch

from lmforge.ir.graph import KVCacheSpec


class KVCache:
    def __init__(self, spec: KVCacheSpec, batch: int, max_seq_len: int, device: torch.device | str = "cpu"):
        self.batch, self.max_seq_len = batch, max_seq_len
        self.buffers: list[torch.Tensor] = []
        for layer in spec.layers:
            for head_dim in (layer.k_head_dim, layer.v_head_dim):
                self.buffers.append(
                    torch.zeros(batch, layer.n_kv_heads, max_seq_len, head_dim, dtype=spec.dtype, device=device)
                )

    def views(self, length: int) -> list[torch.Tensor]:
        """The buffers cut to `length` slots: (batch, n_kv_heads, length, head_dim) each."""
        return [b[:, :, :length] for b in self.buffers]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)
