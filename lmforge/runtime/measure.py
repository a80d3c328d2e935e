"""Measurements of this machine and of an engine, shared by `lmforge bench` and `bench/`.

- memory read bandwidth: best of several `sum()` passes over a tensor much larger than the caches;
- peak matmul FLOP/s: best of several square matmuls in the given dtype;
- TTFT (prefill of the prompt) and TPOT (mean decode step), timed with the device synchronized.
MBU = bytes a decode step must read (weights + the KV cache so far) / TPOT / bandwidth.
MFU = FLOPs of the timed work / time / peak FLOP/s.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(device: torch.device | str = "cpu", nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes per second read by a full-tensor reduction."""
    device = torch.device(device)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    x.sum()
    return nbytes / _best(lambda: x.sum(), device, repeats)


def peak_flops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048,
               repeats: int = 3) -> float:
    """FLOP/s of an n x n x n matmul (best of `repeats`)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    return 2 * n**3 / _best(lambda: a @ b, device, repeats)


@dataclass
class BenchResult:
    batch: int
    prompt_len: int
    new_tokens: int
    ttft_s: float  # prefill of the whole batch
    tpot_s: float  # mean time of one decode step (one token for every row)
    decode_tokens_per_s: float  # batch / tpot
    end_to_end_tokens_per_s: float  # batch * new_tokens / (ttft + all decode steps)
    mbu: float | None  # share of the measured memory bandwidth a decode step uses
    mfu: float | None  # share of the measured peak FLOP/s prefill reaches
    bandwidth_gb_s: float | None
    peak_tflops: float | None
    load_s: float | None = None  # lmforge.load: checksums, reading, load-time layout and repacking

    def as_dict(self) -> dict:
        return asdict(self)


def bench_engine(eng, batch: int = 1, prompt_len: int = 32, new_tokens: int = 64, warmup: int = 1,
                 repeats: int = 3, machine: bool = True) -> BenchResult:
    """Time prefill and decode of random prompts on `eng` (best of `repeats` runs)."""
    from lmforge.runtime.kv_cache import KVCache

    device = eng.device
    if prompt_len + new_tokens > eng.max_seq_len:
        from lmforge.errors import GenerationError

        raise GenerationError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds max_seq_len {eng.max_seq_len}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, eng.vocab_size, (batch, prompt_len), generator=gen).to(device)
    best_ttft = best_decode = float("inf")
    with torch.inference_mode():
        cache = KVCache(eng.ir.kv, batch, eng.max_seq_len, device)
        for run in range(warmup + repeats):
            mask = torch.zeros(batch, eng.max_seq_len, dtype=torch.long, device=device)
            mask[:, :prompt_len] = 1
            _sync(device)
            t0 = time.perf_counter()
            logits = eng.prefill(cache, ids, mask, prompt_len)
            _sync(device)
            t1 = time.perf_counter()
            positions = torch.full((batch, 1), prompt_len - 1, device=device)
            for step in range(new_tokens - 1):  # the first new token comes from the prefill
                token = logits.argmax(-1, keepdim=True)
                positions = positions + 1
                logits = eng.decode(cache, token, positions, mask, prompt_len + step)
            _sync(device)
            t2 = time.perf_counter()
            if run >= warmup:
                best_ttft = min(best_ttft, t1 - t0)
                best_decode = min(best_decode, t2 - t1)
    steps = max(new_tokens - 1, 1)
    tpot = best_decode / steps
    bandwidth = memory_bandwidth(device) if machine else None
    peak = peak_flops(device, eng.ir.kv.dtype) if machine else None
    c = eng.cost  # of the artifact's graph, before the runtime rewrote it for this machine
    param_bytes = sum(t.numel() * t.element_size() for t in eng.ir.weights().values())
    mean_context = prompt_len + steps / 2
    step_bytes = param_bytes + batch * mean_context * eng.ir.kv.bytes_per_token()
    prefill_flops = batch * sum(c.flops_per_token(i) for i in range(prompt_len))
    return BenchResult(
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, ttft_s=best_ttft, tpot_s=tpot,
        decode_tokens_per_s=batch / tpot,
        end_to_end_tokens_per_s=batch * new_tokens / (best_ttft + best_decode),
        mbu=step_bytes / tpot / bandwidth if bandwidth else None,
        mfu=prefill_flops / best_ttft / peak if peak else None,
        bandwidth_gb_s=bandwidth / 1e9 if bandwidth else None,
        peak_tflops=peak / 1e12 if peak else None,
    )


@dataclass
class StepSplit:
    """Where one decode step's time goes: `step_s` is the step run plainly. With a lean step (CPU engines,
    `lean_step.py`), matmuls and attention are their kernels' own times inside the step programs, and "other"
    is the rest: norms, activations and the Python between programs. Otherwise the three parts divide the
    step in the proportions an `fx.Interpreter` run timed the nodes in (the interpreter adds a few
    microseconds a node, so the share of "other", the many small ops, is an upper bound)."""

    step_s: float
    matmul_s: float  # linear layers of every form (float, int4, fp8, int8)
    attention_s: float  # the ops that write the KV cache and attend (lmforge.attention, lmforge.qkv_attention)
    other_s: float  # everything else: norms, rotary, activations, residual adds, views, splits


def step_split(eng, context: int = 64, repeats: int = 10) -> StepSplit:
    """Time one decode step of batch 1 at `context` tokens of cache (random ids), plainly and node by node."""
    from torch import fx

    from lmforge.ir.linear import as_linear
    from lmforge.ir.ops import op_facts
    from lmforge.runtime.kv_cache import KVCache

    device = eng.device
    context = max(1, min(context, eng.max_seq_len - 1))
    cache = KVCache(eng.ir.kv, 1, eng.max_seq_len, device)
    mask = torch.ones(1, context + 1, dtype=torch.long, device=device)
    args = (torch.zeros(1, 1, dtype=torch.long, device=device), torch.full((1, 1), context, device=device), mask,
            *cache.views(context + 1))
    lean = eng.lean_step()
    if lean is not None:
        return _lean_split(lean[0], args, repeats)
    kinds = {}
    for node in eng.ir.graph.nodes:
        facts = op_facts(node.target) if node.op == "call_function" else None
        kinds[node] = ("matmul" if as_linear(node) is not None else
                       "attention" if facts is not None and facts.cache_writer else "other")
    spent = {"matmul": 0.0, "attention": 0.0, "other": 0.0}

    class Timed(fx.Interpreter):
        def run_node(self, node):
            _sync(device)
            start = time.perf_counter()
            out = super().run_node(node)
            _sync(device)
            spent[kinds[node]] += time.perf_counter() - start
            return out

    with torch.inference_mode():
        step = _best(lambda: eng.ir.gm(*args), device, repeats)
        best_total, best = float("inf"), dict(spent)
        for _ in range(max(1, repeats // 2)):
            spent.update(matmul=0.0, attention=0.0, other=0.0)
            Timed(eng.ir.gm).run(*args)
            if sum(spent.values()) < best_total:
                best_total, best = sum(spent.values()), dict(spent)
    share = {k: v / best_total for k, v in best.items()}
    return StepSplit(step, step * share["matmul"], step * share["attention"], step * share["other"])


def _lean_split(gm, args, repeats: int) -> StepSplit:
    """step_split for a lean step: the step programs time their own kernel calls (`Program.timed`)."""
    from lmforge.codegen.cpu_program import kind_class
    from lmforge.runtime.lean_step import segments

    cpu = torch.device("cpu")
    with torch.inference_mode():
        gm(*args)  # records the programs for this layout
        programs = [p for seg in segments(gm) for p in seg.programs.values() if p is not None]
        step = _best(lambda: gm(*args), cpu, repeats)
        for p in programs:
            p.timed()
        for _ in range(repeats):
            gm(*args)
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for p in programs:
        for kind, seconds in zip(p.kinds, p.seconds):
            parts[kind_class(kind)] += seconds / repeats
        p.timed(False)
    kernels = parts["matmul"] + parts["attention"]
    scale = min(1.0, step / kernels) if kernels else 1.0  # the mean of the timed runs may exceed the best step
    matmul, attention = parts["matmul"] * scale, parts["attention"] * scale
    return StepSplit(step, matmul, attention, max(0.0, step - matmul - attention))
