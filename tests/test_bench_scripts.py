"""The GPU benchmark scripts stay runnable between GPU sessions: a smoke run on tiny shapes, on the CPU
under Triton's interpreter, must print its table with small errors against SDPA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET") == "1", reason="the smoke run is for CPU machines")
@pytest.mark.parametrize("script, kinds", [("attention.py", ("| prefill", "| decode")),
                                           ("quant_gemm.py", ("| int4", "| fp8", "| int8"))])
def test_gpu_bench_smoke(script, kinds):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith(kinds)]
    assert len(rows) == 2 * len(kinds)  # two shapes of each kind
    for row in rows:  # bf16 outputs against SDPA, or against the float32 reference
        assert float(row.rstrip(" |").split("|")[-1]) < 5e-2, row


def test_tp_bench_smoke():
    """bench/tp.py on a tiny model: tp 1 in process, tp 2 as two gloo ranks; one table row each."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "tp.py"), "--small", "--new-tokens", "4",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    assert [int(r[0]) for r in rows] == [1, 2]
    assert float(rows[1][4].strip().rstrip(" %")) > 0  # tp 2 spends time in collectives
    assert int(rows[1][5]) == 5  # two all-reduces per layer, one for the vocab-parallel embeddings


def test_int4_cpu_bench_smoke():
    """bench/int4_cpu.py, one round over one copy: a row per shape with both kernels' timings."""
    from lmforge.codegen import cpu_gemv

    if not cpu_gemv.available() or not cpu_gemv.kernel().lib.int4_q8_available():
        pytest.skip("no AVX512-VNNI build of the CPU kernels")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "int4_cpu.py"), "--rounds", "1", "--copies", "1"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(("| smollm", "| llama-1b"))]
    assert len(rows) == 7
    assert all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)


def test_peers_cpu_bench_runs_onnxruntime_genai():
    """bench/peers_cpu.py with an onnxruntime-genai row (where the `peers` extra is installed): its builder makes the
    model from the same weights and the table has its row beside lmforge's int4 rows."""
    pytest.importorskip("onnxruntime_genai")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "peers_cpu.py"), "--ort-genai", "int4-b32",
                             "--rounds", "1", "--model", "tiny"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {cells[1]: cells for cells in (re.split(r"\s{2,}", line) for line in result.stdout.splitlines())
            if cells[0] == "q4_0"}
    assert set(rows) == {"onnxruntime-genai int4-b32", "lmforge int4", "lmforge int4 (+lm_head)"}, result.stdout
    assert float(rows["onnxruntime-genai int4-b32"][2]) > 0


def test_peers_quality_bench_scores_the_demo_model():
    """bench/peers_quality.py, lmforge's bfloat16 and int8 rows (and ONNX Runtime GenAI's fp32 where the
    `peers` extra is installed): perplexities of the trained demo model, int8 within 0.3 % of bfloat16."""
    ort = __import__("importlib").util.find_spec("onnxruntime_genai") is not None
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "peers_quality.py"), "--lmforge", "bfloat16,int8",
                             *(["--ort-genai", "fp32"] if ort else [])], capture_output=True, text=True,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(cells[0], cells[1]): cells for cells in (re.split(r"\s{2,}", line) for line in result.stdout.splitlines())
            if cells[0] in ("lmforge", "onnxruntime-genai")}
    want = {("lmforge", "bfloat16"), ("lmforge", "int8")} | ({("onnxruntime-genai", "fp32")} if ort else set())
    assert set(rows) == want, result.stdout
    assert 60 < float(rows["lmforge", "bfloat16"][2]) < 90  # 74.4 measured
    assert abs(float(rows["lmforge", "int8"][3].rstrip(" %"))) < 0.3
    if ort:  # the same windows of the same ids: its float32 model scores what lmforge's bfloat16 one does, closely
        assert abs(float(rows["onnxruntime-genai", "fp32"][2]) / float(rows["lmforge", "bfloat16"][2]) - 1) < 0.01


@pytest.mark.parametrize("script, args, message", [
    ("peers_cpu.py", [], "give --gguf, --ort-genai"),
    ("peers_cpu.py", ["--llama-bench", "x", "--gguf", "q5_k=/x.gguf"], "precisions among f32, bf16, q4_0, q8_0"),
    ("peers_cpu.py", ["--gguf", "f32=/x.gguf"], "give --llama-bench and --gguf with precisions among"),
    ("peers_cpu.py", ["--ort-genai", "int3"], "--ort-genai (among fp32, int4-b32, int4-b64, int8)"),
    ("peers_cpu.py", ["--ort-genai", "int8", "--prompt", "0"], "--prompt must be at least 1"),
    ("prefill_cpu.py", ["--prompt-lens", "0"], "--prompt-lens must be positive"),
    ("batch_cpu.py", ["--batches", "4,x"], "--batches takes positive integers"),
    ("batch_cpu.py", ["--new-tokens", "1"], "--new-tokens >= 2"),
    ("batch_cpu.py", ["--engines", "int4,bf16"], "--engines takes bf16 first"),
    ("peers_quality.py", ["--gguf", "q4_0=/x.gguf"], "give --llama-perplexity and --gguf (f32 first) together"),
    ("peers_quality.py", ["--ort-genai", "int8"], "--ort-genai takes fp32 first"),
    ("peers_quality.py", ["--lmforge", "int3"], "--lmforge takes any of"),
    ("peers_quality.py", ["--window", "4"], "--window must be between 16 and 1024"),
    ("decode_cpu.py", ["--dtypes", "float16"], "--dtypes takes float32, bfloat16"),
    ("export_cpu.py", ["--rows", "f32,int3"], "unknown row 'int3'; rows: f32, bf16"),
    ("export_cpu.py", ["--rounds", "0"], "--rounds and --threads must be 1 or more"),
])
def test_cpu_bench_scripts_refuse_bad_flags(script, args, message):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
