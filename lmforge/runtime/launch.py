"""Starting the ranks of a tensor-parallel run ourselves, the way torchrun would, on one machine.

`lmforge run ARTIFACT` on an artifact built for tp=N needs N processes. Under torchrun (or any launcher that
sets WORLD_SIZE) this process already is one of them, and `under_launcher()` says so. Otherwise
`start_ranks` (what `run`, `bench` and `eval` call) decides how many ranks the artifact needs and has
`launch(argv, N)` run `python -m lmforge.cli.main *argv` as N children and supervise them:

  - each child gets this process's environment plus torchrun's variables: RANK and LOCAL_RANK (0..N-1),
    WORLD_SIZE and LOCAL_WORLD_SIZE (N), MASTER_ADDR=127.0.0.1, MASTER_PORT (a free TCP port picked here),
    and LMFORGE_LAUNCHED=1; `torch.distributed.init_process_group()` with the default env:// needs no more
  - the children inherit stdin, stdout and stderr; which rank prints is the program's business
  - the first child seen to exit non-zero ends the run: the others get SIGTERM, then SIGKILL after
    `grace_s`, and its exit code is returned (128+signum for a death by signal, as a shell reports it);
    when all exit 0, so does `launch`
  - SIGINT or SIGTERM to this process ends the run the same way and returns 130 or 143, without a
    traceback; a second one during the grace period skips to SIGKILL
  - the children stay in this process group and session, so a terminal's Ctrl-C reaches them too, but
    nothing here relies on it; on Linux each asks the kernel for SIGTERM when its parent dies
    (PR_SET_PDEATHSIG), so even a SIGKILL here leaves no orphans. The kernel ties that to the thread that
    started the child: call `launch` from the main thread, or one that outlives the run.

Rank 0 speaks for the job: the other ranks' stdout goes to /dev/null, and of the error lines every rank
hits, one is printed. Each rank of a job `start_ranks` started leaves its line in the directory named by
LMFORGE_ERROR_DIR (`rank_error`); rank 0 prints its own, and when it has none, `start_ranks` hands back the
lowest other rank's, for the command that started the job to print.

There is no rendezvous, restart or multi-node support: use torchrun for those. Nothing of lmforge is
imported at module level (tests load this file alone); `start_ranks` imports what it needs when called.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.05
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ERROR_DIR = "LMFORGE_ERROR_DIR"  # where the ranks `start_ranks` started leave their error lines


def under_launcher() -> bool:
    """True when this process is one rank of a multi-process job (torchrun's or ours): WORLD_SIZE set in the
    environment."""
    return bool(os.environ.get("WORLD_SIZE"))


class JobExit(NamedTuple):
    """How a job of ranks that `start_ranks` started ended. (A NamedTuple, not a dataclass: tests load this
    file outside `sys.modules`, where a dataclass cannot resolve its annotations.)"""

    code: int  # the job's exit code, as `launch` returns it
    error: str | None  # the lowest other rank's error line when rank 0 left none (rank 0 printed its own)


def start_ranks(argv: list[str], artifact: Path, tp: int | None, device: str) -> JobExit | None:
    """For a tensor-parallel run outside torchrun: start the ranks, each running `lmforge *argv` (the command
    that runs `artifact`), and wait for them. Inside a job: check its size, quieten ranks other than 0.

    tp is the ranks asked for (None: the artifact's). None when this process should go on and run the
    artifact itself: inside a job, or when one rank is wanted."""
    from lmforge.errors import LmforgeError
    from lmforge.runtime.artifact import artifact_tp, read_manifest

    want = tp or artifact_tp(read_manifest(artifact))
    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if tp is not None and tp != world:
            raise LmforgeError(f"--tp {tp} differs from the {world} processes this job was started with")
        if int(os.environ.get("RANK", "0")) != 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 speaks for the job
        return None
    if want == 1:
        return None
    if device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < want:
            raise LmforgeError(f"tp={want} needs {want} GPUs, this machine has {torch.cuda.device_count()}")
    elif "OMP_NUM_THREADS" not in os.environ:  # the ranks share the CPU cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // want))
    sys.stdout.flush()
    with tempfile.TemporaryDirectory(prefix="lmforge-ranks-") as errors:
        os.environ[ERROR_DIR] = errors
        code = launch(argv, want)
        reports = sorted(Path(errors).glob("rank*"), key=lambda f: int(f.name[4:]))
        if code != 0 and reports and reports[0].name != "rank0":  # rank 0 said nothing: say what rank N said
            return JobExit(code, reports[0].read_text())
    return JobExit(code, None)


def rank_error(line: str) -> str | None:
    """The error line this process should print, or None when it should print nothing. In a job
    `start_ranks` started, every rank also leaves the line for the launcher, and only rank 0 prints it (the
    launcher prints another rank's when rank 0 has none: one line, not one per rank)."""
    where = os.environ.get(ERROR_DIR)
    if where and os.path.isdir(where):
        Path(where, f"rank{_rank()}").write_text(line)
        if _rank() != "0":
            return None
    return f"{rank_prefix()}{line}"


def rank_prefix() -> str:
    """What starts a line from a rank that does not speak for its job: 'rank N: ' on rank N > 0, '' on
    rank 0 and outside a job."""
    rank = _rank()
    return f"rank {rank}: " if rank != "0" else ""


def _rank() -> str:
    return os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE") else "0"


def launch(argv: list[str], nproc: int, *, module: str = "lmforge.cli.main", grace_s: float = 5.0) -> int:
    """Run `python -m <module> *argv` as nproc processes (ranks 0..nproc-1) and supervise them; return the
    exit code."""
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    if under_launcher():
        # a child that launched again would start nproc more of itself, and so on
        raise RuntimeError("already one rank of a launched job (WORLD_SIZE is set); not launching again")
    port = _free_port()
    stop = _Stop()
    procs: list[subprocess.Popen] = []
    try:
        stop.install()
        preexec = _child_setup(stop.installed)
        for rank in range(nproc):
            if stop.signum:
                break
            env = dict(os.environ)
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LMFORGE_LAUNCHED="1")
            procs.append(subprocess.Popen([sys.executable, "-m", module, *argv], env=env, preexec_fn=preexec))
        return _supervise(procs, stop)
    finally:
        # also reached on an exception (a failed Popen, say): no child outlives this call
        _terminate(procs, grace_s, stop)
        stop.restore()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _supervise(procs: list[subprocess.Popen], stop: _Stop) -> int:
    while True:
        if stop.signum:
            return 128 + stop.signum
        running = False
        for p in procs:
            rc = p.poll()
            if rc is None:
                running = True
            elif rc != 0:
                # a signal that came while polling wins: a terminal's Ctrl-C kills the children too
                return 128 + stop.signum if stop.signum else _exit_code(rc)
        if not running:
            return 0
        time.sleep(_POLL_S)


def _terminate(procs: list[subprocess.Popen], grace_s: float, stop: _Stop) -> None:
    """SIGTERM to every child still running, SIGKILL to those left after grace_s (or at a further signal to
    us), then wait for all."""
    alive = [p for p in procs if p.poll() is None]
    if not alive:
        return
    for p in alive:
        p.terminate()
    # the signal that stopped the run, if one did, is the first; any further one is the second
    signals_seen = min(stop.count, 1)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline and stop.count <= signals_seen:
        time.sleep(_POLL_S)
        alive = [p for p in alive if p.poll() is None]
    for p in alive:
        p.kill()
    for p in alive:
        p.wait()


class _Stop:
    """SIGINT and SIGTERM handlers for the length of a launch: they record the signal; the loops act on it.

    Installed only from the main thread (Python allows no other) and only for signals not ignored here: a
    job started with SIGINT ignored (in the background, say) keeps ignoring it, and so do its children.
    """

    def __init__(self) -> None:
        self.signum = 0  # the first signal received
        self.count = 0
        self.installed: list[int] = []
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        self.count += 1

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _STOP_SIGNALS:
            if signal.getsignal(sig) == signal.SIG_IGN:
                continue
            self._previous[sig] = signal.signal(sig, self._handler)
            self.installed.append(sig)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _child_setup(reset: list[int]) -> Callable[[], None] | None:
    """The preexec_fn of every child: default dispositions for the signals we handle, and PR_SET_PDEATHSIG."""
    prctl = _prctl()
    parent = os.getpid()

    def setup() -> None:
        # between fork and exec our Python handlers would swallow a signal, the death signal included
        for sig in reset:
            signal.signal(sig, signal.SIG_DFL)
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no death signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return setup


def _prctl() -> Callable[..., int] | None:
    """libc's prctl on Linux, loaded here in the parent (not in the forked child); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
