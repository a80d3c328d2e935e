"""The process group a tensor-parallel engine runs in.

Under torchrun or `lmforge run` (which starts the ranks itself, `runtime/launch.py`), each process finds
its rank in the environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, `LOCAL_RANK`);
`join` starts torch.distributed from it (gloo for the CPU, NCCL for CUDA) and points the graph's
collectives (`codegen/collectives.py`) at it. A process outside such a job runs the whole model alone.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.runtime.launch import under_launcher

TIMEOUT = datetime.timedelta(minutes=10)  # a rank waiting this long for its peers gives up


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int


def join(device: torch.device) -> Rank | None:
    """This process's place in the job it was started in, joining torch.distributed on first use; None for a
    process on its own."""
    import torch.distributed as dist

    from lmforge.codegen import collectives

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if not dist.is_initialized():
        if not under_launcher() or int(os.environ["WORLD_SIZE"]) == 1:
            return None
        if device.type == "cuda":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise LmforgeError(f"cannot join the tensor-parallel job: {str(e).splitlines()[0]}") from None
        atexit.register(_leave)
    collectives.set_group(None)
    return Rank(dist.get_rank(), dist.get_world_size(), local)


def _leave() -> None:
    """At exit: wait for the other ranks, then close the group. A process that exits while its peers still
    talk to it can abort in gloo's threads ("terminate called without an active exception")."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # a peer is gone already: nothing left to wait for
        pass
