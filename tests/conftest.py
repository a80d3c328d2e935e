"""Shared fixtures: tiny random models of real architectures, built from transformers configs (no network).

Every parity test compares against Hugging Face eager on these, never against lmforge's own output.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 131  # odd on purpose: no shape lines up with a power of two


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=False))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    # a sliding window shorter than the test sequences, so the window mask matters
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                            sliding_window=6))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      bos_token_id=0, eos_token_id=0))


ARCHS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gpt2": _gpt2}


def make_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return sharpened(ARCHS[arch]().eval())


def sharpened(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves logits nearly flat; sharpen them so greedy decoding is not a coin toss."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


@pytest.fixture(scope="session", params=list(ARCHS))
def arch(request) -> str:
    return request.param


_models: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="session")
def hf_model(arch):
    if arch not in _models:
        _models[arch] = make_model(arch)
    return _models[arch]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """(arch, dtype) -> artifact path, optimized once per session."""
    import lmforge

    cache: dict[tuple[str, str], str] = {}

    def get(arch: str, dtype: str = "float32"):
        if (arch, dtype) not in cache:
            model = _models.get(arch) or make_model(arch)
            _models[arch] = model
            out = tmp_path_factory.mktemp(f"{arch}-{dtype}") / "art"
            lmforge.optimize(model, out, dtype=dtype, max_seq_len=64)
            cache[(arch, dtype)] = str(out)
        return cache[(arch, dtype)]

    return get


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (nothing imported yet); returns its stdout, failing on a non-zero exit."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def int4_float64(x, qweight, scales, zeros, group_size: int, bias=None) -> torch.Tensor:
    """float64 `x @ W.T + bias` for a packed int4 weight, written out independently of lmforge: q[n, 2j] is the
    low nibble of qweight[n, j], q[n, 2j + 1] the high one; W[n, k] = (q[n, k] - zeros[n, k // G]) *
    scales[n, k // G], zeros None meaning 8."""
    qweight = qweight.cpu().long()
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    q = torch.empty(N, K, dtype=torch.float64)
    q[:, 0::2] = (qweight & 0x0F).double()
    q[:, 1::2] = ((qweight >> 4) & 0x0F).double()
    group = torch.arange(K) // group_size
    zero = 8.0 if zeros is None else zeros.cpu().double()[:, group]
    w = (q - zero) * scales.cpu().double()[:, group]
    y = x.cpu().double() @ w.T
    return y if bias is None else y + bias.cpu().double()


def random_ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=gen)


def run_ranks(fn, tp: int) -> list:
    """fn(rank) for every rank of a tensor-parallel group, one thread per rank, their collectives between the
    threads (`ThreadCommunicator`); returns the results in rank order, re-raising the first failure."""
    import threading

    from lmforge.codegen.collectives import ThreadCommunicator, use_communicator

    comms = ThreadCommunicator.group(tp)
    results: list = [None] * tp
    errors: list = []

    def body(rank: int) -> None:
        use_communicator(comms[rank])
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            errors.append(e)
            comms[rank]._shared["barrier"].abort()  # the other ranks stop waiting for this one

    threads = [threading.Thread(target=body, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results
