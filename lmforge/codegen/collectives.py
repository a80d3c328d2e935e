"""`lmforge::all_reduce` and `lmforge::all_gather`: the collectives a tensor-parallel graph calls.

    all_reduce(x, tp) -> y          y = the sum of x over the tp ranks of the tensor-parallel group
    all_gather(x, dim, tp) -> y     y = the ranks' x concatenated along dim, in rank order

The `shard` pass inserts them; `tp` is in the signature so the graph says what it needs and shape
inference works without a process group. They are functional (a new tensor out, the input untouched), like
`torch.distributed._functional_collectives`, which is what they call by default: over the group
`set_group` named, or the default group of `torch.distributed`.

A `Communicator` can stand in for torch.distributed (`use_communicator`, per thread): the tests run every
rank of a graph in one process, one thread per rank, with `ThreadCommunicator`, and `bench/tp.py` wraps
the real one to time the communication.
"""

from __future__ import annotations

import threading

import torch

from lmforge.ir.ops import OpFacts, register_op

_lib = torch.library.Library("lmforge", "FRAGMENT")
_lib.define("all_reduce(Tensor x, int tp) -> Tensor")
_lib.define("all_gather(Tensor x, int dim, int tp) -> Tensor")


class Communicator:
    """What the ops need from a process group."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank src's x on every rank (the runtime shares sampled tokens this way)."""
        raise NotImplementedError


class TorchCommunicator(Communicator):
    """torch.distributed's functional collectives over `group` (None: the default group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def all_reduce(self, x):
        import torch.distributed._functional_collectives as funcol

        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", self.group))

    def all_gather(self, x, dim):
        import torch.distributed._functional_collectives as funcol

        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the name before torch 2.12
        return funcol.wait_tensor(gather(x.contiguous(), dim % x.dim(), self.group))

    def broadcast(self, x, src=0):
        import torch.distributed as dist

        x = x.contiguous().clone()
        dist.broadcast(x, src=dist.get_global_rank(self.group, src), group=self.group)
        return x


class ThreadCommunicator(Communicator):
    """Collectives between threads of one process, one thread per rank: `ThreadCommunicator.group(n)` gives
    the n ranks' communicators, which share a barrier. For tests and simulation; results are computed on
    every rank from the same inputs, in rank order, so every rank gets bit-identical values."""

    def __init__(self, rank: int, shared: dict):
        self.rank, self.world_size, self._shared = rank, shared["n"], shared

    @classmethod
    def group(cls, n: int) -> list["ThreadCommunicator"]:
        shared = {"n": n, "barrier": threading.Barrier(n), "slots": [None] * n}
        return [cls(r, shared) for r in range(n)]

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        s = self._shared
        s["slots"][self.rank] = x
        s["barrier"].wait()
        values = list(s["slots"])
        s["barrier"].wait()  # nobody overwrites a slot before everyone has read them all
        return values

    def all_reduce(self, x):
        values = self._exchange(x)
        out = values[0].clone()
        for v in values[1:]:
            out += v
        return out

    def all_gather(self, x, dim):
        return torch.cat(self._exchange(x), dim=dim)

    def broadcast(self, x, src=0):
        return self._exchange(x)[src].clone()


_local = threading.local()
_default: list[Communicator | None] = [None]


def set_group(group=None) -> Communicator:
    """Use torch.distributed's `group` (None: the default group) for this process's collectives."""
    _default[0] = TorchCommunicator(group)
    return _default[0]


def use_communicator(comm: Communicator | None) -> None:
    """Use `comm` for the collectives this thread runs (None: back to the process's)."""
    _local.comm = comm


def communicator() -> Communicator:
    comm = getattr(_local, "comm", None) or _default[0]
    if comm is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("a tensor-parallel graph ran without a process group: load it with lmforge.load, "
                               "under torchrun or `lmforge run`")
        comm = set_group(None)
    return comm


def _check(tp: int) -> Communicator:
    comm = communicator()
    if comm.world_size != tp:
        raise RuntimeError(f"the graph was sharded for tp={tp}, but the process group has {comm.world_size} ranks")
    return comm


def _all_reduce(x, tp):
    return _check(tp).all_reduce(x)


def _all_gather(x, dim, tp):
    return _check(tp).all_gather(x, dim)


for _key in ("CPU", "CUDA"):
    _lib.impl("all_reduce", _all_reduce, _key)
    _lib.impl("all_gather", _all_gather, _key)


@torch.library.register_fake("lmforge::all_reduce")
def _all_reduce_fake(x, tp):
    return torch.empty_like(x)


@torch.library.register_fake("lmforge::all_gather")
def _all_gather_fake(x, dim, tp):
    shape = list(x.shape)
    shape[dim] = shape[dim] * tp
    return x.new_empty(shape)


all_reduce = torch.ops.lmforge.all_reduce.default
all_gather = torch.ops.lmforge.all_gather.default

# inserted by the shard pass into an already sharded graph, which it never shards again
register_op(all_reduce, OpFacts(shard="replicated"))
register_op(all_gather, OpFacts(shard="replicated"))
