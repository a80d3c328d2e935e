"""The engine against Hugging Face: logits, greedy tokens through the KV cache, batching, sampling, errors."""

from __future__ import annotations

import pytest
import torch

import lmforge
from lmforge.errors import GenerationError
from tests.conftest import random_ids


@pytest.fixture(scope="module")
def engine(arch, artifacts):
    return lmforge.load(artifacts(arch))


def test_forward_matches_hf(engine, hf_model):
    ids = random_ids(3, 13)
    with torch.no_grad():
        ref = hf_model(ids).logits
    torch.testing.assert_close(engine.forward(ids), ref, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_hf_generate(engine, hf_model):
    ids = random_ids(2, 9, seed=5)
    ours = engine.generate(ids, max_new_tokens=24)
    with torch.no_grad():
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                                do_sample=False, pad_token_id=0)
    assert ours.shape == (2, 9 + 24)
    assert torch.equal(ours, ref)


def test_ragged_batch_equals_each_prompt_alone(engine):
    prompts = [random_ids(1, n, seed=n)[0] for n in (3, 11, 7)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as transformers does it
        ids[row, width - len(p):] = p
        mask[row, width - len(p):] = 1
    batched = engine.generate(ids, max_new_tokens=16, attention_mask=mask)
    for row, p in enumerate(prompts):
        alone = engine.generate(p[None], max_new_tokens=16)
        assert torch.equal(batched[row, width:], alone[0, len(p):]), f"row {row}"


def test_triton_kernels_match_hf_generate_and_ragged_batches(monkeypatch, engine, hf_model):
    """The same artifact with the Triton attention kernels forced (Triton's interpreter on the CPU): greedy
    tokens equal HF's, and a left-padded batch (per-row lengths in the decode kernel) equals each row alone."""
    monkeypatch.setenv("LMFORGE_KERNELS", "triton")
    ids = random_ids(1, 9, seed=5)
    ours = engine.generate(ids, max_new_tokens=10)
    with torch.no_grad():
        ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                                do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)
    prompts = [random_ids(1, n, seed=n)[0] for n in (4, 9)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 9 - len(p):], mask[row, 9 - len(p):] = p, 1
    batched = engine.generate(ids, max_new_tokens=6, attention_mask=mask)
    for row, p in enumerate(prompts):
        assert torch.equal(batched[row, 9:], engine.generate(p[None], max_new_tokens=6)[0, len(p):]), f"row {row}"


def test_sampling_is_seeded_and_top_k_1_is_greedy(engine):
    ids = random_ids(2, 5)
    a = engine.generate(ids, 12, do_sample=True, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = engine.generate(ids, 12, do_sample=True, temperature=0.9, top_p=0.9, generator=torch.Generator().manual_seed(7))
    c = engine.generate(ids, 12, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    k1 = engine.generate(ids, 12, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(k1, engine.generate(ids, 12))


def test_stops_at_eos(engine):
    ids = random_ids(1, 6)
    free = engine.generate(ids, max_new_tokens=10)
    eos = int(free[0, 6 + 3])  # pretend the 4th generated token is eos
    first = (free[0, 6:] == eos).nonzero()[0].item()
    stopped = engine.generate(ids, max_new_tokens=10, eos_token_id=eos)
    assert stopped.shape[1] == 6 + first + 1 and int(stopped[0, -1]) == eos


def test_bad_requests(engine):
    with pytest.raises(GenerationError, match=r"prompt \(60 tokens\) \+ max_new_tokens \(10\) = 70 exceeds this artifact's max_seq_len 64"):
        engine.generate(random_ids(1, 60), max_new_tokens=10)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        engine.generate(torch.tensor([[1, 2, 100000]]))
    with pytest.raises(GenerationError, match="temperature must be > 0"):
        engine.generate(random_ids(1, 3), do_sample=True, temperature=0)
    with pytest.raises(GenerationError, match="seq >= 1"):
        engine.forward(torch.zeros(1, 0, dtype=torch.long))


def test_bfloat16_artifact_tracks_float32(arch, artifacts, hf_model):
    eng = lmforge.load(artifacts(arch, "bfloat16"))
    assert eng.ir.kv.dtype == torch.bfloat16
    ids = random_ids(2, 10)
    with torch.no_grad():
        ref = hf_model(ids).logits
    agree = (eng.forward(ids).float().argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9
