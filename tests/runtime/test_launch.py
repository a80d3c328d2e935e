"""The launcher: torchrun's environment, a real gloo all_reduce, crashes, Ctrl-C, SIGTERM, SIGKILL, no orphans.

The children run a probe module written into tmp_path (found through PYTHONPATH, which launch passes on); they
record what they saw and their pids in files. Every wait has a deadline, and a fixture kills any probe child
still alive at teardown, so a broken launcher fails these tests instead of hanging them or leaking processes.
The last tests cover what the CLI calls: `start_ranks` (how many ranks, and the one error line a job prints)
and `rank_error`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.runtime import launch as launch_mod
from lmforge.errors import LmforgeError
from lmforge.runtime.launch import ERROR_DIR, JobExit, launch, rank_error, start_ranks, under_launcher

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process handling")

PROBE = "lmforge_launch_probe"
PROBE_SRC = '''
import json, os, signal, sys, time
from pathlib import Path

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "LMFORGE_LAUNCHED", "PROBE_MARK")


def write(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader never sees half a file


def main():
    mode, out, flags = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    rank = int(os.environ["RANK"])
    if mode == "env":
        write(out / f"env{rank}.json", json.dumps({k: os.environ.get(k) for k in ENV_KEYS}))
        return 0
    if mode == "allreduce":
        import datetime
        import torch
        import torch.distributed as dist
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))  # env://
        t = torch.tensor([float(rank + 1), 10.0 ** rank])
        dist.all_reduce(t)
        write(out / f"sum{rank}.json",
              json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.tolist()}))
        dist.destroy_process_group()
        return 0
    if "ignore-term" in flags:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    write(out / f"pid{rank}", str(os.getpid()))
    if rank == 1 and mode in ("crash", "selfkill"):
        deadline = time.monotonic() + 10
        while not (out / "pid0").exists():  # rank 0 is up and blocking: the test can check it dies
            if time.monotonic() > deadline:
                return 99
            time.sleep(0.01)
        if mode == "crash":
            return 3
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        while True:  # "block", and rank 0 everywhere: never ends by itself
            time.sleep(0.05)
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the ranks too: end quietly, as the CLI does
        return 130


sys.exit(main())
'''

# The launcher run in a subprocess loads launch.py by path: importing the lmforge package would cost a
# second or more of torch and transformers per run, and launch.py imports nothing of lmforge.
LAUNCHER = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("launch_under_test", {launch_mod.__file__!r})
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
sys.exit(mod.launch(sys.argv[2:], 2, module={PROBE!r}, grace_s=float(sys.argv[1])))
"""


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever inherited it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _is_probe(pid: int) -> bool:
    try:
        return PROBE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _alive(pid)


def _still_alive(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _wait_for_pids(out: Path, n: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        files = [out / f"pid{rank}" for rank in range(n)]
        if all(f.exists() for f in files):
            return [int(f.read_text()) for f in files]
        assert time.monotonic() < deadline, f"the children did not start within {timeout}s"
        time.sleep(0.02)


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError in the main thread after `seconds` (launch's cleanup then ends its children)."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"launch still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture()
def out(tmp_path, monkeypatch) -> Path:
    """A directory for the children's files, the probe importable in them; leftover probe children are killed."""
    (tmp_path / f"{PROBE}.py").write_text(PROBE_SRC)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = tmp_path / "out"
    d.mkdir()
    yield d
    for f in d.glob("pid[0-9]"):
        pid = int(f.read_text())
        if _alive(pid) and _is_probe(pid):
            os.kill(pid, signal.SIGKILL)


def _run(out: Path, mode: str, *flags: str, grace_s: float = 5.0, limit_s: float = 15.0) -> tuple[int, float]:
    t0 = time.monotonic()
    with _time_limit(limit_s):
        code = launch([mode, str(out), *flags], 2, module=PROBE, grace_s=grace_s)
    return code, time.monotonic() - t0


def test_under_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not under_launcher()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_launcher()
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        launch(["--help"], 2)  # a rank that launched again would multiply itself


def test_two_ranks_get_torchruns_environment(out, monkeypatch):
    monkeypatch.setenv("PROBE_MARK", "passed-through")
    code, _ = _run(out, "env")
    assert code == 0
    seen = [json.loads((out / f"env{rank}.json").read_text()) for rank in range(2)]
    for rank, env in enumerate(seen):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "127.0.0.1"
        assert env["LMFORGE_LAUNCHED"] == "1"
        assert env["PROBE_MARK"] == "passed-through"
    assert seen[0]["MASTER_PORT"] == seen[1]["MASTER_PORT"]
    assert 0 < int(seen[0]["MASTER_PORT"]) < 65536


def test_gloo_all_reduce_between_the_ranks(out):
    code, _ = _run(out, "allreduce", limit_s=25.0)
    assert code == 0
    for rank in range(2):
        got = json.loads((out / f"sum{rank}.json").read_text())
        assert got == {"rank": rank, "world": 2, "sum": [3.0, 11.0]}  # [1 + 2, 10**0 + 10**1]


def test_a_crash_ends_the_run_with_its_exit_code(out):
    code, elapsed = _run(out, "crash", grace_s=10.0)
    assert code == 3
    assert elapsed < 5.0  # rank 0, blocked for ever, was sent SIGTERM at once, not SIGKILL after the grace
    pids = _wait_for_pids(out, 2, timeout=0)
    assert _still_alive(pids, timeout=0) == []  # launch waited for both


def test_death_by_signal_returns_128_plus_signum(out):
    code, _ = _run(out, "selfkill")
    assert code == 128 + signal.SIGKILL
    assert _still_alive(_wait_for_pids(out, 2, timeout=0), timeout=0) == []


def test_a_child_ignoring_sigterm_is_killed_after_the_grace(out):
    code, elapsed = _run(out, "crash", "ignore-term", grace_s=0.5)
    assert code == 3
    assert 0.5 <= elapsed < 5.0
    assert _still_alive(_wait_for_pids(out, 2, timeout=0), timeout=0) == []


@contextlib.contextmanager
def _launcher(out: Path, mode: str, *flags: str, grace_s: float = 5.0, new_session: bool = False):
    """The launcher in a subprocess, its output (and its children's) in a file: a pipe that leaked children held
    open would block the reader."""
    log = out.parent / "launcher.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(grace_s), mode, str(out), *flags],
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=new_session)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig, expected", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_launcher_ends_every_rank(out, sig, expected):
    with _launcher(out, "block") as (proc, log):
        pids = _wait_for_pids(out, 2)
        assert proc.poll() is None
        proc.send_signal(sig)  # the launcher only: the parent must not rely on a terminal's process group
        assert proc.wait(timeout=5) == expected
        text = log.read_text()
        assert "Traceback" not in text, text
        assert _still_alive(pids, timeout=0) == []


def test_ctrl_c_from_a_terminal_reaches_the_whole_group(out):
    # the launcher leads its own process group here, as a shell's foreground job does; the ranks are in it
    with _launcher(out, "block", new_session=True) as (proc, log):
        pids = _wait_for_pids(out, 2)
        assert all(os.getpgid(pid) == proc.pid for pid in pids)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=5) == 130
        text = log.read_text()
        assert "Traceback" not in text, text
        assert _still_alive(pids, timeout=0) == []


def test_a_second_sigint_skips_the_grace(out):
    with _launcher(out, "block", "ignore-term", grace_s=60.0) as (proc, log):
        pids = _wait_for_pids(out, 2)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(subprocess.TimeoutExpired):  # the children ignore SIGTERM: the grace runs
            proc.wait(timeout=0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 130
        assert "Traceback" not in log.read_text()
        assert _still_alive(pids, timeout=0) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_sigkill_to_the_launcher_takes_the_ranks_with_it(out):
    with _launcher(out, "block") as (proc, _):
        pids = _wait_for_pids(out, 2)
        proc.kill()  # no handler runs: only the kernel's death signal can end the children
        proc.wait(timeout=5)
        assert _still_alive(pids, timeout=5) == []


def test_rank_error_prints_one_line_per_job(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(ERROR_DIR, raising=False)
    assert rank_error("error: x") == "error: x"  # no job: as is
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rank_error("error: x") == "rank 1: error: x"  # torchrun's rank 1: every rank prints, each says who
    monkeypatch.setenv(ERROR_DIR, str(tmp_path))  # a job start_ranks started: the line is left for it
    assert rank_error("error: x") is None
    monkeypatch.setenv("RANK", "0")
    assert rank_error("error: y") == "error: y"
    assert {f.name: f.read_text() for f in tmp_path.iterdir()} == {"rank0": "error: y", "rank1": "error: x"}


def test_start_ranks_inside_a_job_checks_its_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LmforgeError, match="--tp 3 differs from the 2 processes this job was started with"):
        start_ranks(["run"], Path("unused"), 3, "cpu")
    assert start_ranks(["run"], Path("unused"), 2, "cpu") is None  # this rank goes on and runs the artifact
    monkeypatch.delenv("WORLD_SIZE")
    assert start_ranks(["run"], Path("unused"), 1, "cpu") is None  # one rank: this process is it


@pytest.mark.parametrize("left, code, error", [
    ({"rank0": "error: a", "rank1": "error: b"}, 1, None),  # rank 0 printed its own
    ({"rank10": "error: ten", "rank2": "error: two"}, 1, "error: two"),  # the lowest rank by number, not name
    ({"rank1": "error: b"}, 0, None),  # a job that succeeded says nothing more
])
def test_start_ranks_hands_back_one_error_line(monkeypatch, left, code, error):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(ERROR_DIR, "")  # start_ranks sets both; monkeypatch puts them back after
    started = []

    def fake_launch(argv, nproc):  # the ranks' part: leave error lines where start_ranks said
        started.append((argv, nproc))
        for name, line in left.items():
            Path(os.environ[ERROR_DIR], name).write_text(line)
        return code

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    assert start_ranks(["run", "a", "--tp", "3"], Path("unused"), 3, "cpu") == JobExit(code, error)
    assert started == [(["run", "a", "--tp", "3"], 3)]
