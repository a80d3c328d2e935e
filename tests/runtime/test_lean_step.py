"""The lean decode step (CPU engines): runs of kernel calls recorded as step programs, each made by one C call.
Its tokens are Hugging Face's, and its logits the bound graph's bit for bit: the same kernels in the same order."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.codegen import cpu_gemv, cpu_program
from lmforge.runtime import lean_step
from lmforge.runtime.measure import step_split
from tests.conftest import random_ids
from tests.ir.test_capture_archs import build_family
from tests.runtime.test_fuse_qkv_attention import decode_logits

pytestmark = pytest.mark.skipif(not cpu_program.available(), reason="no C compiler for the CPU kernels")


def lean_and_bound(eng, ids, steps=5):
    """decode_logits through the lean step, then through the bound graph (the same engine, lean step off)."""
    lean = decode_logits(eng, ids, steps)
    kept, eng._lean = eng.lean_step(), None
    bound = decode_logits(eng, ids, steps)
    eng._lean = kept
    return lean, bound


def programs(eng) -> list:
    return [p for seg in lean_step.segments(eng.lean_step()[0]) for p in seg.programs.values()]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"], indirect=True)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_step_is_the_bound_graph_exactly(arch, dtype, artifacts, hf_model, monkeypatch):
    # the GEMV kernels, whatever this machine's timing picks (on some, PyTorch's float32 matmul is the faster)
    monkeypatch.setenv("LMFORGE_WEIGHT_LAYOUT", "gemv")
    eng = lmforge.load(artifacts(arch, dtype))
    gm, stats = eng.lean_step()
    assert stats.segments >= 1 and stats.recorded > 0
    if arch != "gpt2":  # every op of a Llama-family decode step has a recorder: one program for the whole step
        assert stats.segments == 1 and stats.left == {}, stats
    ids = random_ids(2, 7)
    lean, bound = lean_and_bound(eng, ids)
    assert torch.equal(lean, bound)
    # one program per segment, reused while the cache grows (kv_len is the program's argument, not its layout)
    assert all(p is not None for p in programs(eng)) and len(programs(eng)) == stats.segments
    if dtype == "float32":
        with torch.no_grad():
            want = hf_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(eng.generate(ids, max_new_tokens=6), want)


@pytest.mark.parametrize("quant, dtype, kinds", [
    (dict(quant="int4", group_size=32), "bfloat16", {"int4", "gemv_bf16", "glu_silu_bf16"}),
    (dict(quant="int8"), "bfloat16", {"int8", "gemv_bf16", "glu_silu_bf16"}),
    (dict(quant="int8"), "float32", {"int8", "glu_silu_f32"}),
    (dict(quant="int4", group_size=32), "bfloat16", {"amx", "glu_silu_bf16"}),  # every linear on AMX tiles
])
def test_quantized_lean_step(tmp_path, hf_model_llama, quant, dtype, kinds, monkeypatch):
    if "amx" in kinds and not cpu_gemv.kernel().amx_available:
        pytest.skip("this CPU has no AMX (or the process may not use it)")
    monkeypatch.setenv("LMFORGE_LINEAR_WAY", "amx" if "amx" in kinds else "kernel")
    path = lmforge.optimize(hf_model_llama, tmp_path / "art", dtype=dtype, max_seq_len=64, **quant).path
    eng = lmforge.load(path)
    ids = random_ids(2 if quant["quant"] == "int8" else 1, 5)
    lean, bound = lean_and_bound(eng, ids)
    assert torch.equal(lean, bound)
    (program,) = programs(eng)
    assert kinds | {"qkv_attention", "add_rms_norm"} <= set(program.kinds), program.kinds


@pytest.fixture
def hf_model_llama():
    from tests.conftest import make_model

    return make_model("llama")


def test_unrecordable_ops_split_the_step(tmp_path):
    """Qwen3's per-head q/k norms keep its attention unfused (no recorder): each layer's attention runs between
    programs, and the tokens are still Hugging Face's."""
    model = build_family("qwen3")
    eng = lmforge.load(lmforge.optimize(model, tmp_path / "art", max_seq_len=64).path)
    gm, stats = eng.lean_step()
    assert stats.segments > 1 and "lmforge.attention" in stats.left, stats
    ids = random_ids(1, 6)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(eng.generate(ids, max_new_tokens=4), want)
    lean, bound = lean_and_bound(eng, ids)
    assert torch.equal(lean, bound)


def test_a_layout_the_kernels_decline_runs_the_sub_graph(artifacts):
    """Nine rows are more than the GEMV takes: that layout gets no program, and the step runs node by node."""
    eng = lmforge.load(artifacts("llama", "bfloat16"))
    ids = random_ids(9, 4)
    lean, bound = lean_and_bound(eng, ids, steps=2)
    assert torch.equal(lean, bound)
    (segment,) = lean_step.segments(eng.lean_step()[0])
    assert list(segment.programs.values()) == [None] and list(segment.declined.values()) == ["lmforge.linear"], segment.declined


def test_off_switch_and_other_devices(artifacts, monkeypatch):
    eng = lmforge.load(artifacts("llama"))
    monkeypatch.setenv("LMFORGE_LEAN_STEP", "0")
    assert eng.lean_step() is None
    assert not lean_step.enabled(torch.device("cuda"))
    ids = random_ids(1, 5)
    assert eng.generate(ids, max_new_tokens=3).shape == (1, 8)


def test_mismatched_cache_and_mask_lengths_are_refused(artifacts):
    eng = lmforge.load(artifacts("llama"))
    gm, _ = eng.lean_step()
    cache = eng._cache_for(1)
    views = cache.views(5)
    views[0] = cache.buffers[0][:, :, :6]
    with pytest.raises(ValueError, match="lengths differ"), torch.inference_mode():
        gm(torch.zeros(1, 1, dtype=torch.long), torch.full((1, 1), 4), torch.ones(1, 5, dtype=torch.long), *views)


def test_step_split_times_the_programs(artifacts):
    eng = lmforge.load(artifacts("llama", "bfloat16"))
    split = step_split(eng, context=8, repeats=3)
    assert split.matmul_s > 0 and split.attention_s > 0
    assert split.matmul_s + split.attention_s + split.other_s == pytest.approx(split.step_s)


def test_layouts_past_the_bound_are_not_recorded(artifacts, monkeypatch):
    """A segment records at most MAX_LAYOUTS input layouts (here 2: batches 1 and 2); batch 3 runs node by node."""
    monkeypatch.setattr(lean_step, "MAX_LAYOUTS", 2)
    eng = lmforge.load(artifacts("llama", "bfloat16"))
    for batch in (1, 2, 3):
        lean, bound = lean_and_bound(eng, random_ids(batch, 4), steps=2)
        assert torch.equal(lean, bound)
    (segment,) = lean_step.segments(eng.lean_step()[0])
    assert len(segment.programs) == 2 and all(p is not None for p in segment.programs.values())
