"""The CLI as a user meets it: click's runner for each command, and one real subprocess end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmforge.cli.main import main
from tests.conftest import make_model


def invoke(*args: str) -> tuple[int, str, str]:
    """Run `lmforge ARGS` in-process through `main` (which turns errors into one line + exit code)."""
    runner = CliRunner()
    result = runner.invoke(_Main(), list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


class _Main:
    """Adapts `main(argv)` to CliRunner, which wants a click command."""

    name = "lmforge"

    def main(self, args, prog_name=None, **kwargs):
        sys.exit(main(list(args)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    code, stdout, stderr = invoke("optimize", "-o", str(out))
    assert code == 0, stderr
    assert f"wrote {out}" in stdout and "remove-noops" in stdout
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "qwen2"
    make_model("qwen2").save_pretrained(path)
    return path


def test_help_has_examples():
    for command in ([], ["optimize"], ["run"], ["inspect"], ["bench"], ["eval"]):
        code, stdout, _ = invoke(*command, "--help")
        assert code == 0 and "Examples:" in stdout, command


def test_optimize_local_dir_then_inspect_json(hf_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, stderr = invoke("optimize", str(hf_dir), "-o", str(out), "--dtype", "bfloat16", "--max-seq-len", "128")
    assert code == 0, stderr
    code, stdout, _ = invoke("inspect", str(out), "--json")
    info = json.loads(stdout)
    assert info["dtype"] == "bfloat16" and info["max_seq_len"] == 128
    # both attentions fused: one op each, no separate cache writes or SDPA left
    assert info["ops"]["lmforge.attention.default"] == 2
    assert "aten.scaled_dot_product_attention.default" not in info["ops"] and "aten.index_copy_.default" not in info["ops"]
    assert info["attention"] == {"attentions": 2, "fused": 2, "unfused": {}}
    assert info["kv_bytes_per_token"] == 2 * 2 * 1 * 16 * 2  # layers, k+v, 1 kv head, head_dim 16, bf16
    assert info["flops_per_token"]["matmul"] > 0 and info["params"] > 0
    assert [p["pass"] for p in info["passes"]][:4] == ["remove-noops", "dce", "fuse-attention",
                                                       "convert-dtype{dtype=bfloat16}"]


def test_inspect_text_and_ir(demo):
    code, stdout, _ = invoke("inspect", str(demo))
    assert code == 0
    assert "KV cache: 4 layers" in stdout and "FLOPs/token" in stdout and "aten.linear.default" in stdout
    assert "attention: 4 of 4 fused into lmforge.attention" in stdout and "unfused" not in stdout
    code, stdout, _ = invoke("inspect", str(demo), "--ir")
    assert code == 0 and stdout.startswith("graph ") and "input %k_cache_3" in stdout
    assert stdout.count("lmforge.attention.default(") == 4


def test_inspect_load_prints_the_load_pipeline_and_the_lean_step(demo):
    code, stdout, _ = invoke("inspect", str(demo), "--load", "cpu")
    assert code == 0 and "load pipeline: fuse-linears," in stdout and "bind-cpu-kernels" in stdout
    from lmforge.codegen import cpu_program

    if cpu_program.available():  # the demo model is a Llama: its whole decode step is one program
        assert "lean decode step: 1 step program(s) over" in stdout and "between them" not in stdout
    code, stdout, _ = invoke("inspect", str(demo), "--load", "cpu", "--json")
    info = json.loads(stdout)
    assert code == 0 and (info["lean_step"] is None or info["lean_step"]["segments"] == 1)


def test_run_greedy_and_sampled(demo):
    """`run` prints the prompt, then the continuation the API's `generate` picks: greedily (streamed or
    not), and sampled with --temperature/--top-p/--seed (one seed one text, another seed another)."""
    import torch

    import lmforge

    eng = lmforge.load(demo)
    prompt = "The for statement"
    ids = torch.tensor([eng.encode(prompt)])

    def expected(**sampling) -> str:
        new = eng.generate(ids, max_new_tokens=12, **sampling)[0, ids.shape[1]:].tolist()
        return prompt + eng.decode_text(new) + "\n"

    greedy = expected()
    assert len(greedy) > len(prompt) + 5
    for flags in ((), ("--no-stream",)):
        code, stdout, stderr = invoke("run", str(demo), "--prompt", prompt, "-n", "12", *flags)
        assert (code, stdout) == (0, greedy), stderr
    sampled = {}
    for seed in (3, 4):
        code, stdout, stderr = invoke("run", str(demo), "-p", prompt, "-n", "12", "--temperature", "0.8",
                                      "--top-p", "0.9", "--seed", str(seed))
        generator = torch.Generator().manual_seed(seed)
        assert (code, stdout) == (0, expected(do_sample=True, temperature=0.8, top_p=0.9, generator=generator)), stderr
        sampled[seed] = stdout
    assert sampled[3] != sampled[4] and greedy not in sampled.values()


def test_run_on_token_ids(demo, hf_dir, tmp_path):
    """An artifact without a tokenizer runs on token ids; the ids printed are those generate returns."""
    import torch

    import lmforge

    out = tmp_path / "notok"
    assert invoke("optimize", str(hf_dir), "-o", str(out), "--max-seq-len", "32")[0] == 0
    code, stdout, stderr = invoke("run", str(out), "--prompt-ids", "5,17,42", "-n", "6")
    assert code == 0, stderr
    expected = lmforge.load(out).generate(torch.tensor([[5, 17, 42]]), max_new_tokens=6)[0].tolist()
    assert [int(t) for t in stdout.split()] == expected
    code, _, stderr = invoke("run", str(out), "--prompt", "hello")
    assert code == 1 and "this artifact has no tokenizer; pass token ids" in stderr


def test_bench_json(demo):
    code, stdout, stderr = invoke("bench", str(demo), "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1", "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["decode_tokens_per_s"] > 0 and r["load_s"] > 0
    assert 0 < r["mbu"] and 0 < r["mfu"]


@pytest.mark.parametrize("args, message", [
    (["run", "/nonexistent/art", "-p", "hi"], "error: no artifact at /nonexistent/art"),
    (["run", "{demo}", "-p", "hi", "-n", "100000"], "exceeds this artifact's max_seq_len"),
    (["run", "{demo}", "-p", "hi", "--temperature", "-1"], "error: Invalid value for '--temperature'"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--max-seq-len", "100000"], "error: max_seq_len must be between 1 and the model's position limit 256"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--pipeline", "dce,frobnicate"], "error: unknown pass 'frobnicate'"),
    (["optimize", "{tmp}", "-o", "{tmp}/x"], "the directory has no config.json"),
    (["optimize", "{t5_dir}", "-o", "{tmp}/x"], "error: unsupported model"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--dtype", "int3"], "error: Invalid value for '--dtype'"),
    (["inspect"], "error: Missing argument 'ARTIFACT'"),
    (["run", "{demo}", "--prompt-ids", "1,x"], "error: Invalid value for '--prompt-ids': expected comma-separated token ids"),
    (["run", "{demo}", "--prompt-ids", "1,99999"], "is outside the vocabulary"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--group-size", "64"], "error: --group-size, --symmetric, --quant-method, --zero-points, --skip and --override need --quant"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--quant", "fp8", "--symmetric"], "are int4 settings; fp8 has none"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--quant", "int8", "--group-size", "64"], "are int4 settings; int8 has none"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--quant", "int4", "--group-size", "48"], "error: Invalid value for '--group-size'"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--quant", "int4", "--override", "*.down_proj=g32"], "error: bad quantization override '*.down_proj=g32': expected PATTERN:SETTINGS"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--quant", "int4", "--override", "*.down_proj:g7"], "error: int4 group size must be one of 32, 64, 128, 256, got 7"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--quant", "int4", "--quant-method", "hqq", "--symmetric"], "error: int4 method 'hqq' optimises zero points, so it is asymmetric only"),
    (["eval", "{demo}", "--text", "{tmp}/none.txt"], "error: Invalid value for '--text'"),
    (["eval", "{demo}", "--window", "100000"], "error: window must be between 2 and the artifact's max_seq_len"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--tp", "3"], "shard: tp=3 does not divide the 4 heads of 16 of model.layers.0.self_attn.q_proj"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--tp", "0"], "error: Invalid value for '--tp'"),
    (["optimize", "{hf_dir}", "-o", "{tmp}/x", "--tp", "2", "--pipeline", "dce"], "error: pass either tp=... or a pipeline with a shard step"),
    (["run", "{demo}", "-p", "hi", "--tp", "0"], "error: Invalid value for '--tp'"),
])
def test_bad_input_is_one_line(args, message, demo, hf_dir, tmp_path):
    from transformers import T5Config

    T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8, d_ff=8, vocab_size=10).save_pretrained(tmp_path / "t5")
    args = [a.format(demo=demo, hf_dir=hf_dir, tmp=tmp_path, t5_dir=tmp_path / "t5") for a in args]
    code, stdout, stderr = invoke(*args)
    assert code != 0
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert "Traceback" not in stderr


def test_debug_shows_the_traceback(tmp_path):
    code, _, stderr = invoke("--debug", "run", str(tmp_path / "none"), "-p", "x")
    assert code == 1 and "Traceback" in stderr and stderr.strip().endswith(f"error: no artifact at {tmp_path / 'none'}")


def test_corrupt_artifact_from_the_cli(demo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (broken / "model.safetensors").write_bytes(bytes(data))
    code, _, stderr = invoke("run", str(broken), "-p", "x")
    assert code == 1 and stderr.strip() == f"error: {broken / 'model.safetensors'} fails its sha256 check: the file is corrupt or was modified"


def test_quantize_inspect_and_eval(tmp_path):
    """The issue's commands on the demo model: int4 with a skip list and an override, then inspect and eval."""
    out = tmp_path / "demo-int4"
    code, stdout, stderr = invoke("optimize", "-o", str(out), "--quant", "int4", "--group-size", "64",
                                  "--skip", "lm_head,*.gate_proj", "--override", "*.down_proj:g32+sym")
    assert code == 0, stderr
    assert "quantized: 20 layers int4 g64 asym rtn, 4 layers int4 g32 sym rtn; 5 kept in float" in stdout
    assert "kept model.layers.0.mlp.gate_proj: skipped by pattern '*.gate_proj'" in stdout
    code, stdout, _ = invoke("inspect", str(out))
    assert code == 0 and "quantized: 20 layers int4 g64" in stdout and "lmforge.int4_linear" in stdout
    code, stdout, _ = invoke("inspect", str(out), "--json")
    q = json.loads(stdout)["quantization"]
    assert q["scheme"] == "int4" and q["layers"]["model.layers.1.mlp.down_proj"]["symmetric"] is True
    assert "MatMulNBits" in q["layouts"]["int4"]["compatible_with"]
    code, stdout, stderr = invoke("eval", str(out), "--max-tokens", "600", "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    assert r["quantization"] == "int4" and r["tokens"] == 600 - 3 and r["windows"] == 3 and 20 < r["perplexity"] < 200
    code, stdout, _ = invoke("eval", str(out), "--max-tokens", "600")
    assert code == 0 and stdout.startswith("perplexity ") and "over 597 tokens (3 windows of up to 256)" in stdout


def test_int8_optimize_inspect_run_and_eval(tmp_path):
    """`--quant int8` on the demo model: every layer but the head, the manifest's layout, the one-line summary in
    inspect, a run, and a perplexity within 0.3 % of bfloat16's on the same text."""
    out, plain = tmp_path / "demo-int8", tmp_path / "demo"
    code, stdout, stderr = invoke("optimize", "-o", str(out), "--quant", "int8")
    assert code == 0, stderr
    assert "quantized: 28 layers int8; 1 kept in float" in stdout
    code, stdout, _ = invoke("inspect", str(out), "--json")
    q = json.loads(stdout)["quantization"]
    assert q["scheme"] == "int8" and q["layers"]["model.layers.1.mlp.down_proj"] == {"scheme": "int8", "version": 1}
    assert "pack-quantized" in q["layouts"]["int8"]["compatible_with"]
    code, stdout, stderr = invoke("run", str(out), "-p", "The for statement", "-n", "8")
    assert code == 0 and stdout.strip(), stderr
    assert invoke("optimize", "-o", str(plain))[0] == 0
    ppl = {}
    for name, art in (("int8", out), ("bf16", plain)):
        code, stdout, stderr = invoke("eval", str(art), "--max-tokens", "1200", "--json")
        assert code == 0, stderr
        ppl[name] = json.loads(stdout)["perplexity"]
    assert ppl["int8"] < 1.003 * ppl["bf16"], ppl


@pytest.mark.slow
def test_real_subprocess_end_to_end(tmp_path):
    """`lmforge optimize` with no model writes ./lmforge-demo; `lmforge run` streams from it."""
    exe = shutil.which("lmforge") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "lmforge"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    opt = subprocess.run(cmd + ["optimize"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert opt.returncode == 0, opt.stderr[-2000:]
    assert (tmp_path / "lmforge-demo" / "manifest.json").is_file()
    run = subprocess.run(cmd + ["run", "lmforge-demo", "--prompt", "The while statement", "-n", "16"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("The while statement") and len(run.stdout.split()) > 4
    bad = subprocess.run(cmd + ["run", "missing"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: give either --prompt TEXT or --prompt-ids IDS"


def test_print_after_and_dump_ir(hf_dir, tmp_path):
    out, dump = tmp_path / "o", tmp_path / "ir"
    code, stdout, stderr = invoke("optimize", str(hf_dir), "-o", str(out), "--print-after", "remove-noops",
                                  "--dump-ir", str(dump), "--pipeline", "remove-noops,dce")
    assert code == 0, stderr
    assert "// IR after remove-noops\ngraph " in stdout and "_assert_tensor_metadata" not in stdout.split("wrote")[0]
    assert sorted(p.name for p in dump.iterdir()) == ["00-remove-noops.txt", "01-dce.txt"]
    info = json.loads(invoke("inspect", str(out), "--json")[1])
    assert info["pipeline"] == "remove-noops,dce" and info["dtype"] == "float32"


@pytest.mark.parametrize("env, message", [
    ({"LMFORGE_KERNELS": "fast"}, "error: LMFORGE_KERNELS='fast': expected one of auto, torch, triton"),
    ({"LMFORGE_KERNELS": "triton", "TRITON_INTERPRET": "0"},
     "error: LMFORGE_KERNELS=triton on the CPU needs Triton's interpreter: set TRITON_INTERPRET=1"),
])
def test_bad_kernel_setting_is_one_line(monkeypatch, demo, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, stdout, stderr = invoke("run", str(demo), "-p", "x", "-n", "2")
    assert code != 0 and stderr.strip() == message and stdout == ""


def test_tensor_parallel_optimize_inspect_and_one_process_run(demo, tmp_path):
    out = tmp_path / "tp2"
    code, stdout, stderr = invoke("optimize", "-o", str(out), "--tp", "2")
    assert code == 0, stderr
    # per step: 4 layers x (attention output + MLP down) + the vocab-parallel embeddings; 256 bf16 values each
    assert "tensor parallel: tp=2, 30 weights sharded, 9 all-reduces per step, 4608 bytes all-reduced" in stdout
    code, stdout, _ = invoke("inspect", str(out))
    assert code == 0 and "4608 bytes all-reduced" in stdout and "KV cache (each of 2 ranks)" in stdout
    info = json.loads(invoke("inspect", str(out), "--json")[1])
    assert info["tensor_parallel"]["files"] == ["model.rank0.safetensors", "model.rank1.safetensors"]
    code, stdout, stderr = invoke("inspect", str(out), "--tp-plan", "4")  # the shards merged, then planned for 4
    assert code == 0, stderr
    assert stdout.startswith("tensor-parallel plan, tp=4: 21 column-parallel, 8 row-parallel, 1 vocab-parallel")
    assert "2 heads of 64, each held whole by 2 ranks" in stdout  # the demo's 2 key/value heads over 4 ranks
    # --tp 1: this process alone, the shards merged; greedy text equals the one-device artifact's
    code, merged, stderr = invoke("run", str(out), "-p", "The for statement", "-n", "12", "--tp", "1")
    assert code == 0, stderr
    assert merged == invoke("run", str(demo), "-p", "The for statement", "-n", "12")[1]
