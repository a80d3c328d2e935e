"""The collectives a tensor-parallel graph calls (`codegen/collectives.py`): `lmforge::all_reduce` and
`lmforge::all_gather` between threads standing in for ranks (`ThreadCommunicator`), their fake (shape)
implementations, and the errors when the group does not fit the graph."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge.codegen.collectives import (Communicator, ThreadCommunicator, all_gather, all_reduce, communicator,
                                         use_communicator)
from tests.conftest import run_ranks


@pytest.fixture(autouse=True)
def no_thread_communicator():
    """Each test leaves this thread with the process's communicator, as it found it."""
    use_communicator(None)
    yield
    use_communicator(None)


def _rank_input(rank: int, shape=(2, 3), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_all_reduce_sums_over_the_ranks_and_every_rank_gets_the_same_bits(tp):
    def rank_fn(rank):
        x = _rank_input(rank)
        before = x.clone()
        y = all_reduce(x, tp)
        assert torch.equal(x, before) and y.data_ptr() != x.data_ptr()  # functional: the input is untouched
        return y

    results = run_ranks(rank_fn, tp)
    expected = sum(_rank_input(r).double() for r in range(tp))
    for y in results:
        assert y.shape == (2, 3) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, results[0])  # bit-identical on every rank, so the ranks never drift apart


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_all_gather_concatenates_in_rank_order(dim):
    tp = 3
    results = run_ranks(lambda rank: all_gather(_rank_input(rank, (2, 4)), dim, tp), tp)
    expected = torch.cat([_rank_input(r, (2, 4)) for r in range(tp)], dim=dim)
    for y in results:
        assert torch.equal(y, expected)


def test_broadcast_hands_every_rank_the_sources_tensor():
    results = run_ranks(lambda rank: communicator().broadcast(torch.tensor([rank * 10]), src=1), 3)
    assert [int(y) for y in results] == [10, 10, 10]


def test_several_collectives_in_a_row_keep_their_order():
    """The exchange's second barrier: a fast rank must not overwrite its slot before the others read it."""
    def rank_fn(rank):
        out = []
        for step in range(20):
            out.append(int(all_reduce(torch.tensor([rank + 100 * step]), 4)))
        return out

    expected = [sum(r + 100 * step for r in range(4)) for step in range(20)]
    assert run_ranks(rank_fn, 4) == [expected] * 4


def test_communicator_is_per_thread():
    comms = ThreadCommunicator.group(2)
    use_communicator(comms[1])
    seen = []
    other = threading.Thread(target=lambda: (use_communicator(comms[0]), seen.append(communicator().rank)))
    other.start()
    other.join()
    assert seen == [0] and communicator() is comms[1] and communicator().world_size == 2


def test_fake_implementations_give_the_output_shapes():
    """On meta tensors (as export and shape inference see them): no communicator needed, gather multiplies dim."""
    x = torch.empty(2, 3, 5, device="meta", dtype=torch.bfloat16)
    for tp in (2, 4):
        assert all_reduce(x, tp).shape == (2, 3, 5) and all_reduce(x, tp).dtype == torch.bfloat16
        assert all_gather(x, 0, tp).shape == (2 * tp, 3, 5)
        assert all_gather(x, 1, tp).shape == (2, 3 * tp, 5)
        assert all_gather(x, -1, tp).shape == (2, 3, 5 * tp)


def test_fake_matches_the_real_op():
    """torch.library's own check that schema and fake implementation agree with what the op computes."""
    def rank_fn(rank):
        x = _rank_input(rank, (2, 3))
        torch.library.opcheck(all_gather, (x, 1, 2), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(all_reduce, (x, 2), test_utils=("test_schema", "test_faketensor"))

    run_ranks(rank_fn, 2)


class _TwoRanks(Communicator):
    """A group of two that would answer at once (so a missing check fails the test instead of hanging it)."""

    world_size = 2

    def all_reduce(self, x):
        return x.clone()

    def all_gather(self, x, dim):
        return torch.cat([x, x], dim=dim)


def test_a_graph_sharded_for_another_tp_is_refused():
    use_communicator(_TwoRanks())
    x = torch.ones(2)
    for op, args in ((all_reduce, (x, 3)), (all_gather, (x, 0, 3))):
        with pytest.raises(RuntimeError, match=r"the graph was sharded for tp=3, but the process group has 2 ranks"):
            op(*args)


def test_no_process_group_is_a_clear_error():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("this process has joined a process group")
    with pytest.raises(RuntimeError, match="a tensor-parallel graph ran without a process group"):
        all_reduce(torch.ones(2), 2)
