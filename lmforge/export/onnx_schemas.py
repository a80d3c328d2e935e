"""ONNX Runtime's fused LLM operators as `onnx` schemas, so that onnxscript can build them and `onnx.checker`
can check a graph that holds them.

ONNX Runtime defines these ops in its own C++ (`contrib_defs.cc`); the `onnx` package knows none of them.
`register()` declares, once per process, the inputs, outputs and attributes `--format onnx` uses of each (the
subset the exporter writes, as ONNX Runtime's ContribOperators.md documents them):

    com.microsoft  GroupQueryAttention, MatMulNBits, RotaryEmbedding, SkipSimplifiedLayerNormalization
    ai.onnx        SimplifiedLayerNormalization (ONNX Runtime registers it in the default domain, since 1)

A schema already known to `onnx` (a later `onnx` that ships one, or a second call) is left as it is.
"""

from __future__ import annotations

import onnx
from onnx import defs

MS_DOMAIN = "com.microsoft"
_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
_P = defs.OpSchema.FormalParameter
_OPTIONAL = defs.OpSchema.FormalParameterOption.Optional
_A = defs.OpSchema.AttrType


def _in(name: str, type_str: str, optional: bool = False):
    return _P(name, type_str, param_option=_OPTIONAL) if optional else _P(name, type_str)


def _attr(name: str, kind, required: bool = False):
    return defs.OpSchema.Attribute(name, kind, "", required=required)


def _schemas() -> list[defs.OpSchema]:
    return [
        defs.OpSchema(
            "GroupQueryAttention", MS_DOMAIN, 1,
            inputs=[_in("query", "T"), _in("key", "T", True), _in("value", "T", True),
                    _in("past_key", "T", True), _in("past_value", "T", True), _in("seqlens_k", "M"),
                    _in("total_sequence_length", "M"), _in("cos_cache", "T", True), _in("sin_cache", "T", True)],
            outputs=[_in("output", "T"), _in("present_key", "T"), _in("present_value", "T")],
            type_constraints=[("T", _FLOATS, ""), ("M", ["tensor(int32)"], "")],
            attributes=[_attr("num_heads", _A.INT, True), _attr("kv_num_heads", _A.INT, True),
                        _attr("scale", _A.FLOAT), _attr("local_window_size", _A.INT), _attr("do_rotary", _A.INT),
                        _attr("rotary_interleaved", _A.INT), _attr("softcap", _A.FLOAT)]),
        defs.OpSchema(
            "MatMulNBits", MS_DOMAIN, 1,
            inputs=[_in("A", "T1"), _in("B", "T2"), _in("scales", "T1"), _in("zero_points", "T3", True),
                    _in("g_idx", "T4", True), _in("bias", "T1", True)],
            outputs=[_in("Y", "T1")],
            type_constraints=[("T1", _FLOATS, ""), ("T2", ["tensor(uint8)"], ""),
                              ("T3", ["tensor(uint8)"] + _FLOATS, ""), ("T4", ["tensor(int32)"], "")],
            attributes=[_attr("K", _A.INT, True), _attr("N", _A.INT, True), _attr("bits", _A.INT),
                        _attr("block_size", _A.INT, True), _attr("accuracy_level", _A.INT)]),
        defs.OpSchema(
            "RotaryEmbedding", MS_DOMAIN, 1,
            inputs=[_in("input", "T"), _in("position_ids", "M"), _in("cos_cache", "T"), _in("sin_cache", "T")],
            outputs=[_in("output", "T")],
            type_constraints=[("T", _FLOATS, ""), ("M", ["tensor(int64)"], "")],
            attributes=[_attr("interleaved", _A.INT), _attr("is_packed_batching", _A.INT), _attr("num_heads", _A.INT),
                        _attr("rotary_embedding_dim", _A.INT), _attr("scale", _A.FLOAT)]),
        defs.OpSchema(
            "SkipSimplifiedLayerNormalization", MS_DOMAIN, 1,
            inputs=[_in("input", "T"), _in("skip", "T"), _in("gamma", "T"), _in("bias", "T", True)],
            outputs=[_in("output", "T"), _in("mean", "U", True), _in("inv_std_var", "U", True),
                     _in("input_skip_bias_sum", "T", True)],
            type_constraints=[("T", _FLOATS, ""), ("U", ["tensor(float)"], "")],
            attributes=[_attr("epsilon", _A.FLOAT)]),
        defs.OpSchema(
            "SimplifiedLayerNormalization", "", 1,
            inputs=[_in("X", "T"), _in("scale", "V")],
            outputs=[_in("Y", "V")],  # (and an optional inv_std_var, which the exporter never asks for)
            type_constraints=[("T", _FLOATS, ""), ("V", _FLOATS, "")],
            attributes=[_attr("axis", _A.INT), _attr("epsilon", _A.FLOAT), _attr("stash_type", _A.INT)]),
    ]


def register() -> None:
    """Declare the schemas to `onnx` (idempotent)."""
    for schema in _schemas():
        if not defs.has(schema.name, schema.domain):
            defs.register_schema(schema)


def check(model: str) -> None:
    """`onnx.checker` on a model file, with these ops declared (full check: shapes and types inferred too)."""
    register()
    onnx.checker.check_model(model, full_check=True)
