"""No per-architecture code: more decoder-only families capture and match HF eager through the cache."""

from __future__ import annotations

import pytest
import torch

from lmforge.ir.capture import capture
from lmforge.passes import PassManager, default_pipeline
from tests.ir.test_capture import run_chunks

COMMON = dict(vocab_size=131, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)

# family -> (config class, model class, config overrides); each exercises something the main four do not
FAMILIES = {
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(intermediate_size=112, num_key_value_heads=2, pad_token_id=0)),  # fused qkv
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(intermediate_size=112, num_key_value_heads=2, head_dim=16)),  # scaled embeddings
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(intermediate_size=112, num_key_value_heads=2, head_dim=16,
                                                         sliding_window=4)),  # alternating windows, softcapping
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=112, num_key_value_heads=2, head_dim=16)),  # q/k norms
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=112)),  # partial rotary, parallel residual
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=112, word_embed_proj_dim=64)),  # learned offset positions
    "falcon": ("FalconConfig", "FalconForCausalLM", dict()),  # multi-query attention
    "phi": ("PhiConfig", "PhiForCausalLM", dict(intermediate_size=112)),  # partial rotary, dense layernorm
}


def build_family(family: str, **overrides) -> torch.nn.Module:
    """A tiny random model of `family` (seed 0), with `overrides` on top of its config in FAMILIES."""
    import transformers

    config_cls, model_cls, base = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **base, **overrides})
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_hf(family):
    model = build_family(family)
    ir = capture(model)
    PassManager(default_pipeline(None, 64)).run(ir)
    ids = torch.randint(1, 131, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(run_chunks(ir, ids, [6, 1, 4]), ref, rtol=1e-4, atol=1e-4)
