"""Which layers get which scheme: skip globs, per-pattern overrides (last match wins), and their errors."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.quant import Fp8Config, Int4Config, LayerRules, make_config


def test_defaults_skip_lm_head_only():
    rules = LayerRules.parse("int4", {"group_size": 64}, "lm_head", "")
    assert rules.for_layer(["model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj.weight"]) == \
        (Int4Config(group_size=64), None)
    assert rules.for_layer(["lm_head", "model.embed_tokens"]) == (None, "skipped by pattern 'lm_head'")


def test_overrides_apply_in_order_and_can_unskip():
    rules = LayerRules.parse("int4", {}, "lm_head|*.gate_proj",
                             "*.down_proj:g32+sym;model.layers.0.*:skip;lm_head:fp8;*.layers.0.mlp.down_proj:hqq+asym")
    assert rules.for_layer(["model.layers.3.mlp.down_proj"])[0] == Int4Config(group_size=32, symmetric=True)
    assert rules.for_layer(["model.layers.3.mlp.gate_proj"]) == (None, "skipped by pattern '*.gate_proj'")
    assert rules.for_layer(["model.layers.0.self_attn.q_proj"]) == (None, "skipped by override 'model.layers.0.*'")
    assert rules.for_layer(["lm_head"]) == (Fp8Config(), None)  # an override without skip quantizes
    # the last override to match wins: layer 0's down_proj is skipped, then re-enabled with HQQ
    assert rules.for_layer(["model.layers.0.mlp.down_proj"])[0] == Int4Config(group_size=32, method="hqq")


def test_fp8_ignores_int4_settings():
    assert make_config("fp8", group_size=64, symmetric=True) == Fp8Config()


@pytest.mark.parametrize("scheme, overrides, message", [
    ("int3", "", "unknown quantization scheme 'int3'"),
    ("int4", "*.down_proj", "bad quantization override '\\*.down_proj': expected PATTERN:SETTINGS"),
    ("int4", "*.down_proj:g48", "group size must be one of"),
    ("int4", "*.down_proj:fast", "bad quantization setting 'fast' in '\\*.down_proj:fast'; use int4, fp8, int8, "
                                 "g32, g64, g128, g256, sym, asym, rtn, hqq, izp, fzp or skip$"),
])
def test_bad_rules_fail_in_one_line(scheme, overrides, message):
    with pytest.raises(LmforgeError, match=message):
        LayerRules.parse(scheme, {}, "lm_head", overrides)  # at parse time, before any layer is seen
