"""The text printer shows one line per node with its spec."""

from __future__ import annotations

from lmforge.ir.capture import capture
from lmforge.ir.printer import format_ir
from tests.conftest import make_model


def test_printer_lines():
    text = format_ir(capture(make_model("llama")))
    lines = text.splitlines()
    assert lines[0].startswith("graph LlamaForCausalLM") and lines[-1] == "}"
    assert "  input %input_ids: i64[batch, seq]" in lines
    assert "  input %k_cache_0: f32[batch, 2, kv_len, 16]" in lines
    assert any(l.startswith("  %model_embed_tokens_weight: f32[131, 64] = weight 'model.embed_tokens.weight'") for l in lines)
    assert any("= aten.index_copy_.default(%k_cache_0, 2, " in l for l in lines)
    assert lines[-2].startswith("  return (%")
