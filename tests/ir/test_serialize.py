"""Graph serialization: JSON + safetensors round trip; loading evaluates nothing and refuses unknown ops."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from lmforge.errors import ArtifactError
from lmforge.ir.capture import capture
from lmforge.ir.printer import format_ir
from lmforge.ir.serialize import graph_from_json, graph_to_json, weights_to_save
from lmforge.ir.spec import dtype_from_name
from tests.conftest import make_model, random_ids
from tests.ir.test_capture import run_chunks


@pytest.fixture(scope="module")
def gpt2_ir():
    return capture(make_model("gpt2"))


def _roundtrip(ir):
    doc = json.loads(json.dumps(graph_to_json(ir)))  # through real JSON text
    return doc, graph_from_json(doc, weights_to_save(ir), ir.config)


def test_roundtrip_is_identical(gpt2_ir):
    doc, back = _roundtrip(gpt2_ir)
    assert format_ir(back).splitlines()[1:] == format_ir(gpt2_ir).splitlines()[1:]
    assert graph_to_json(back) == doc
    ids = random_ids(2, 9)
    torch.testing.assert_close(run_chunks(back, ids, [5, 4]), run_chunks(gpt2_ir, ids, [5, 4]), rtol=0, atol=0)


# The format as the module docstring writes it down: the only keys and value tags a graph.json may hold.
TOP_LEVEL = {"format", "version", "kv", "weights", "nodes", "quantization", "tensor_parallel", "aliases"}
NODE_KEYS = {"name", "op", "target", "args", "kwargs", "spec", "global", "inserted"}
NODE_OPS = {"placeholder", "get_attr", "call_function", "output"}
VALUE_TAGS = {
    "node": lambda v: isinstance(v, str),
    "tuple": lambda v: isinstance(v, list),
    "float": lambda v: v in ("inf", "-inf", "nan"),
    "dtype": lambda v: isinstance(v, str) and isinstance(dtype_from_name(v), torch.dtype),
    "device": lambda v: isinstance(v, str) and isinstance(torch.device(v), torch.device),
    "layout": lambda v: v == "strided",
    "memory_format": lambda v: v in ("contiguous_format", "preserve_format", "channels_last"),
}
MAX_STR = 200  # names, op names and size expressions; a tensor or an object smuggled in as text is longer


def _check_value(v, where: str) -> None:
    if v is None or isinstance(v, (bool, int)):
        return
    if isinstance(v, str):
        assert len(v) <= MAX_STR, f"{where}: a {len(v)}-character string"
        return
    if isinstance(v, float):
        assert math.isfinite(v), f"{where}: non-finite float {v} outside a {{'float': ...}} tag"
        return
    if isinstance(v, list):
        for x in v:
            _check_value(x, where)
        return
    assert isinstance(v, dict) and len(v) == 1, f"{where}: {v!r} is not a tagged value"
    ((tag, inner),) = v.items()
    assert tag in VALUE_TAGS and VALUE_TAGS[tag](inner), f"{where}: bad tagged value {v!r}"
    if tag == "tuple":
        _check_value(inner, where)


def _check_spec(spec, where: str) -> None:
    if spec is None:
        return
    assert isinstance(spec, dict) and len(spec) == 1, f"{where}: bad spec {spec!r}"
    ((tag, inner),) = spec.items()
    if tag == "tensor":
        assert set(inner) == {"shape", "dtype"} and isinstance(dtype_from_name(inner["dtype"]), torch.dtype), where
        assert all(isinstance(d, int) or (isinstance(d, str) and len(d) <= MAX_STR) for d in inner["shape"]), where
    elif tag == "sym":
        assert isinstance(inner, str) and len(inner) <= MAX_STR, where
    else:
        assert tag == "tuple", f"{where}: bad spec {spec!r}"
        for s in inner:
            _check_spec(s, where)


def test_format_has_no_pickle_and_is_plain_json(gpt2_ir, monkeypatch):
    """graph.json is strict JSON (no NaN, no tuples or non-string keys that JSON would silently change) in the
    documented grammar, every value one of the documented tags, and writing it never pickles anything."""
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while serializing a graph")

    for name in ("dump", "dumps", "Pickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    doc = graph_to_json(gpt2_ir)
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc  # nothing JSON cannot hold as it is
    assert set(doc) <= TOP_LEVEL and doc["format"] == "lmforge.graph" and doc["version"] == 1
    assert doc["kv"] == {"dtype": "float32", "layers": [{"n_kv_heads": 4, "k_head_dim": 16, "v_head_dim": 16}] * 2}
    assert set(doc["weights"]) == set(gpt2_ir.weights())
    for attr, info in doc["weights"].items():  # names only: the tensors live in the safetensors file
        assert info == {"name": gpt2_ir.weight_names.get(attr, attr), "kind": gpt2_ir.weight_kind(attr)}, attr
    assert [n["name"] for n in doc["nodes"]] == [n.name for n in gpt2_ir.graph.nodes]
    for node in doc["nodes"]:
        where = f"node {node['name']}"
        assert set(node) <= NODE_KEYS and node["op"] in NODE_OPS, where
        assert isinstance(node.get("target", ""), str), where
        for arg in node.get("args", []):
            _check_value(arg, where)
        for key, value in node.get("kwargs", {}).items():
            assert isinstance(key, str), where
            _check_value(value, where)
        _check_spec(node.get("spec"), where)
    addmm = next(n for n in doc["nodes"] if n["op"] == "call_function" and n["target"] == "aten.addmm.default")
    assert addmm["spec"] == {"tensor": {"shape": ["batch*seq", 192], "dtype": "float32"}}  # c_attn: 3 * 64


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.load", "aten.no_such_op.default", "evil.mm.default"])
def test_refuses_ops_outside_the_allowlist(gpt2_ir, target):
    doc, _ = _roundtrip(gpt2_ir)
    node = next(n for n in doc["nodes"] if n["op"] == "call_function")
    node["target"] = target
    with pytest.raises(ArtifactError, match="op"):
        graph_from_json(doc, weights_to_save(gpt2_ir), {})


def test_refuses_other_versions_and_dangling_refs(gpt2_ir):
    doc, _ = _roundtrip(gpt2_ir)
    weights = weights_to_save(gpt2_ir)
    with pytest.raises(ArtifactError, match="version 2"):
        graph_from_json({**doc, "version": 2}, weights, {})
    broken = json.loads(json.dumps(doc))
    call = next(n for n in broken["nodes"] if n["op"] == "call_function" and any(isinstance(a, dict) and "node" in a for a in n.get("args", [])))
    call["args"] = [{"node": "nowhere"} if isinstance(a, dict) and "node" in a else a for a in call["args"]]
    with pytest.raises(ArtifactError, match="unknown node 'nowhere'"):
        graph_from_json(broken, weights, {})
    missing = dict(weights)
    missing.pop(next(iter(missing)))
    with pytest.raises(ArtifactError, match="missing from the safetensors"):
        graph_from_json(doc, missing, {})


def test_non_finite_floats_survive():
    from lmforge.ir.serialize import _Decoder, _encode

    for value in (float("inf"), float("-inf")):
        assert _Decoder("x").value(json.loads(json.dumps(_encode(value)))) == value
    assert _Decoder("x").value(_encode((1, 2.5, torch.bfloat16))) == (1, 2.5, torch.bfloat16)
