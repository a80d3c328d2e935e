"""Tensor parallelism across real processes: two gloo ranks on the CPU, started by lmforge's launcher and by
`lmforge run` itself; logits equal Hugging Face's within 1e-5 (float32) for Llama, Qwen2 (GQA) and GPT-2, also
with int4 weights; a killed rank or a Ctrl-C ends the whole run with no process left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmforge
from lmforge.runtime.launch import launch
from tests.conftest import make_model, random_ids

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX processes and /proc")

WORKER = "lmforge_tp_worker"
WORKER_SRC = '''
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lmforge

out = Path(sys.argv[1])
ids = load_file(str(out / "ids.safetensors"))["ids"]
for art in sys.argv[2:]:
    eng = lmforge.load(art)  # joins the gloo group from torchrun's variables, loads this rank's shard
    logits = eng.forward(ids)
    save_file({"logits": logits.contiguous()}, str(out / f"{Path(art).name}.rank{eng.rank}.of{eng.tp}.safetensors"))
'''
CASES = {"llama": ("llama", None), "qwen2": ("qwen2", None), "gpt2": ("gpt2", None), "llama-int4": ("llama", "int4")}


@pytest.fixture(scope="module")
def tp2_artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp2")
    models, paths = {}, {}
    for name, (arch, quant) in CASES.items():
        models[name] = make_model(arch)
        kwargs = dict(quant=quant, group_size=32, skip=[]) if quant else {}
        paths[name] = root / name
        lmforge.optimize(models[name], paths[name], max_seq_len=256, tp=2, **kwargs)
    return models, paths


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).parents[2])]),
               OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_two_gloo_ranks_match_hf(tp2_artifacts, tmp_path, monkeypatch):
    models, paths = tp2_artifacts
    (tmp_path / f"{WORKER}.py").write_text(WORKER_SRC)
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    ids = random_ids(2, 9)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    code = launch([str(tmp_path), *(str(p) for p in paths.values())], 2, module=WORKER)
    assert code == 0
    for name, model in models.items():
        with torch.no_grad():
            hf = model(ids).logits
        whole = lmforge.load(paths[name]).forward(ids)  # this process alone: the shards put back together
        for rank in range(2):
            got = load_file(str(tmp_path / f"{name}.rank{rank}.of2.safetensors"))["logits"]
            torch.testing.assert_close(got, whole, rtol=0, atol=1e-5, msg=f"{name} rank {rank} vs one process")
            if CASES[name][1] is None:
                torch.testing.assert_close(got, hf, rtol=0, atol=1e-5, msg=f"{name} rank {rank} vs HF")


def test_lmforge_run_starts_the_ranks(tp2_artifacts, tmp_path):
    models, paths = tp2_artifacts
    ids = random_ids(1, 4)
    with torch.no_grad():
        expected = models["qwen2"].generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    prompt = ",".join(str(int(t)) for t in ids[0])
    result = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "run", str(paths["qwen2"]), "--prompt-ids",
                             prompt, "-n", "6"], capture_output=True, text=True, timeout=180, env=_env(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines() == [" ".join(str(int(t)) for t in expected[0])]  # rank 0 alone prints


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("how", ["kill-rank-1", "ctrl-c"])
def test_a_dead_rank_or_ctrl_c_ends_the_run(tp2_artifacts, tmp_path, how):
    _, paths = tp2_artifacts
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli.main", "run", str(paths["llama"]), "--prompt-ids",
                             "1,2,3", "-n", "250"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(tmp_path))
    children: list[int] = []
    try:
        assert proc.stdout.read(6) == b"1 2 3 "  # rank 0 is generating (the launcher started both ranks)
        children = _children(proc.pid)
        assert len(children) == 2
        if how == "kill-rank-1":
            rank1 = next(c for c in children if b"RANK=1\0" in Path(f"/proc/{c}/environ").read_bytes())
            os.kill(rank1, signal.SIGKILL)
            expected = 128 + signal.SIGKILL
        else:
            proc.send_signal(signal.SIGINT)
            expected = 130
        code = proc.wait(timeout=30)
        stderr = proc.stderr.read().decode()
        assert code == expected, stderr[-2000:]
        assert "Traceback" not in stderr
        deadline = time.monotonic() + 10
        while not all(_gone(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(c) for c in children)
    finally:
        for pid in children + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_an_error_in_every_rank_is_one_line(tp2_artifacts, tmp_path):
    _, paths = tp2_artifacts  # 4 query heads: 3 ranks cannot split them; each rank finds out, one line says so
    result = subprocess.run([sys.executable, "-m", "lmforge.cli.main", "run", str(paths["qwen2"]), "--prompt-ids",
                             "1,2", "--tp", "3"], capture_output=True, text=True, timeout=180, env=_env(tmp_path))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tp=3 does not divide the 4 heads" in lines[0], lines
