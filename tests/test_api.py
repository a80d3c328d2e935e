"""The Python API: lmforge.optimize / lmforge.load as users call them."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from tests.conftest import make_model


def test_optimize_leaves_the_model_alone(tmp_path):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    art = lmforge.optimize(model, tmp_path / "a", dtype="bfloat16", max_seq_len=32)
    assert art.dtype == "bfloat16" and art.max_seq_len == 32
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_demo_model_by_default(tmp_path):
    art = lmforge.optimize(None, tmp_path / "demo")
    m = art.manifest
    assert m["dtype"] == "bfloat16"  # the checkpoint's dtype
    assert m["max_seq_len"] == 1024  # its position limit
    assert m["tokenizer"]["eos_token_id"] == 0 and m["tokenizer"]["files"][0] == "special_tokens_map.json"
    eng = lmforge.load(art.path)
    text = "".join(eng.stream("The if statement", max_new_tokens=8))
    # the artifact is the demo checkpoint: it continues as Hugging Face greedy does on those weights
    from transformers import AutoModelForCausalLM

    from lmforge.demo import model_dir

    hf = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.bfloat16).eval()
    ids = torch.tensor([eng.encode("The if statement")])
    want = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    assert text == eng.decode_text(want) and len(text) > 5


@pytest.mark.parametrize("kwargs, message", [
    (dict(dtype="int4"), "dtype must be float32, bfloat16 or float16, got 'int4'"),
    (dict(max_seq_len=0), "max_seq_len must be between 1"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(LmforgeError, match=message):
        lmforge.optimize(make_model("gpt2"), tmp_path / "x", **kwargs)


def test_half_model_cannot_be_converted_further(tmp_path):
    model = make_model("gpt2").to(torch.bfloat16)
    with pytest.raises(LmforgeError, match="the model is in torch.bfloat16; pass a float32 model"):
        lmforge.optimize(model, tmp_path / "x", dtype="float16")
    art = lmforge.optimize(model, tmp_path / "y", max_seq_len=16)  # kept in its own dtype: fine
    assert art.dtype == "bfloat16"


def test_custom_pipeline_decides_the_dtype_unless_one_is_given(tmp_path):
    model = make_model("qwen2")
    art = lmforge.optimize(model, tmp_path / "a", max_seq_len=16, pipeline="remove-noops,convert-dtype{dtype=float16},dce")
    assert art.dtype == "float16" and art.manifest["pipeline"] == "remove-noops,convert-dtype{dtype=float16},dce"
    with pytest.raises(LmforgeError, match=r"left the graph in torch.float32, but dtype bfloat16 was asked for"):
        lmforge.optimize(model, tmp_path / "b", dtype="bfloat16", max_seq_len=16, pipeline="remove-noops,dce")
    assert not (tmp_path / "b").exists()
