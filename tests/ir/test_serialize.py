"""Graph serialization: JSON + safetensors round trip; loading evaluates nothing and refuses unknown ops."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import ArtifactError
from lmforge.ir.capture import capture
from lmforge.ir.printer import format_ir
from lmforge.ir.serialize import graph_from_json, graph_to_json, weights_to_save
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


def test_format_has_no_pickle_and_is_plain_json(gpt2_ir):
    text = json.dumps(graph_to_json(gpt2_ir))
    assert "__reduce__" not in text and "pickle" not in text
    doc = json.loads(text)
    assert doc["format"] == "lmforge.graph" and doc["version"] == 1
    linear = next(n for n in doc["nodes"] if n["op"] == "call_function" and n["target"].startswith("aten.addmm"))
    assert linear["spec"]["tensor"]["dtype"] == "float32"


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
