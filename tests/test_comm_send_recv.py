"""The point-to-point path of telechat2_ms.parallel.comm (HCCL batched send/recv, taken on Ascend only) in a fake
world on the CPU: one thread per member of a 3-member group whose global ranks are not 0..2, and a stand-in for
`mindspore.mint.distributed.batch_isend_irecv` that delivers sends through a mailbox. It checks what this machine
can: each member sends to and receives from the right global ranks, every send meets a receive of its shape,
and ring_shift / neighbour_exchange return what their all-gather form returns (tests/msrun/comm_checks.py, on the
emulated backend here and on HCCL by the `ascend` test)."""
import threading

import numpy as np
import pytest

from mindspore import Tensor
import mindspore.mint.distributed as dist

from telechat2_ms.parallel import comm

RANKS = (3, 5, 8)  # global ranks of the group's members 0, 1, 2
SHAPE = (2, 3)


class FakeWorld:
    def __init__(self, size: int):
        self.local = threading.local()
        self.mailbox = {}  # (sender, receiver) global ranks -> arrays in send order
        self.barrier = threading.Barrier(size)
        self.turn = threading.Lock()  # MindSpore's PyNative runtime is not thread-safe: one member runs at a time
        self.calls = []

    def wait_for_all(self):
        self.turn.release()
        try:
            self.barrier.wait()
        finally:
            self.turn.acquire()

    def batch_isend_irecv(self, op_list):
        me = self.local.rank
        self.calls.append((me, [(op.op, op.peer, op.group) for op in op_list]))
        for op in op_list:
            if op.op == "isend":
                self.mailbox.setdefault((me, op.peer), []).append(op.tensor.asnumpy())
        self.wait_for_all()
        for op in op_list:
            if op.op == "irecv":
                sent = self.mailbox[(op.peer, me)].pop(0)  # KeyError / IndexError: a receive with no send
                assert sent.shape == tuple(op.tensor.shape), (me, op.peer)
                op.tensor.assign_value(Tensor(sent))
        self.wait_for_all()
        return [type("Handle", (), {"wait": lambda self: None})()]


def run_members(monkeypatch, fn):
    """fn(group) on every member at once over the fake world -> ({member: result}, the world)."""
    world = FakeWorld(len(RANKS))
    monkeypatch.setattr(dist, "batch_isend_irecv", world.batch_isend_irecv)
    monkeypatch.setattr(comm, "uses_send_recv", lambda: True)
    results, errors = {}, []

    def member(index):
        world.local.rank = RANKS[index]
        with world.turn:
            try:
                results[index] = fn(comm.Group("fake_p2p", RANKS, index))
            except BaseException as err:  # reported by the test, not lost in the thread
                errors.append(err)
                world.barrier.abort()

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(RANKS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(world.mailbox.values()), f"sends nobody received: {world.mailbox}"
    return results, world


def data(member: int) -> np.ndarray:
    return np.arange(6, dtype=np.float32).reshape(SHAPE) + 100 * member


def test_send_recv_only_on_the_native_ascend_backend():
    assert comm.is_emulated()  # a plain CPU process
    assert not comm.uses_send_recv()


@pytest.mark.parametrize("shift", [1, -1, 2])
def test_ring_shift_sends_to_the_member_shift_ahead(monkeypatch, shift):
    results, world = run_members(monkeypatch, lambda g: comm.ring_shift(Tensor(data(g.rank)), g, shift).asnumpy())
    for member in range(len(RANKS)):
        np.testing.assert_array_equal(results[member], data((member - shift) % len(RANKS)))
    for me, ops_ in world.calls:  # one send to the member `shift` ahead, one receive from `shift` behind
        i = RANKS.index(me)
        assert ops_ == [("isend", RANKS[(i + shift) % 3], "fake_p2p"), ("irecv", RANKS[(i - shift) % 3], "fake_p2p")]


def test_neighbour_exchange_sends_forward_and_back_along_the_chain(monkeypatch):
    results, world = run_members(monkeypatch, lambda g: tuple(
        t.asnumpy() for t in comm.neighbour_exchange(Tensor(data(g.rank)), Tensor(2 * data(g.rank)), g)))
    zero = np.zeros(SHAPE, np.float32)
    for member, (from_prev, from_next) in results.items():
        np.testing.assert_array_equal(from_prev, data(member - 1) if member > 0 else zero)
        np.testing.assert_array_equal(from_next, 2 * data(member + 1) if member < 2 else zero)
    peers = {RANKS.index(me): sorted((kind, peer) for kind, peer, _ in ops_) for me, ops_ in world.calls}
    assert peers == {0: [("irecv", 5), ("isend", 5)],  # the ends talk to one neighbour only
                     1: [("irecv", 3), ("irecv", 8), ("isend", 3), ("isend", 8)],
                     2: [("irecv", 5), ("isend", 5)]}
