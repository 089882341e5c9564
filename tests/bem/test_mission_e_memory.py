"""Infini-attention's compressive memory: a closed gate writes nothing (bit for bit), the delta rule
stores and retrieves associations exactly when the keys' features are orthogonal and does not write
what the memory already holds, and the straight-through gate is hard forward and soft backward."""

from __future__ import annotations

import torch

from bem.missions.mission_e.memory import CompressiveMemory, MemoryState, straight_through


def filled(mem: CompressiveMemory, seed: int = 0) -> MemoryState:
    g = torch.Generator().manual_seed(seed)
    state = MemoryState.zeros(2, 3, 8, 5)
    return mem.write(torch.randn(2, 3, 6, 8, generator=g), torch.randn(2, 3, 6, 5, generator=g), state)


def test_a_closed_gate_leaves_the_memory_bit_identical() -> None:
    for delta in (False, True):
        mem = CompressiveMemory(3, delta=delta)
        state = filled(mem)
        k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 5)
        after = mem.write(k, v, state, gate=torch.zeros(2, 4))
        assert torch.equal(after.M, state.M) and torch.equal(after.z, state.z)
        opened = mem.write(k, v, state, gate=torch.ones(2, 4))
        assert not torch.equal(opened.M, state.M)
        assert torch.allclose(opened.M, mem.write(k, v, state).M)  # a gate of ones is no gate


def one_hot_keys(n: int, d: int) -> torch.Tensor:
    return torch.eye(d)[:n].reshape(1, 1, n, d)


def test_orthogonal_keys_store_and_retrieve_each_association_exactly() -> None:
    d, n = 8, 5
    keys, values = one_hot_keys(n, d), torch.randn(1, 1, n, 3)
    for delta in (False, True):
        mem = CompressiveMemory(1, delta=delta, feature=lambda x: x)  # features = the one-hot keys
        state = mem.write(keys, values, MemoryState.zeros(1, 1, d, 3))
        assert torch.allclose(mem.retrieve(keys, state), values, atol=1e-6)


def test_the_delta_rule_does_not_write_what_the_memory_already_returns() -> None:
    d, n = 8, 5
    keys, values = one_hot_keys(n, d), torch.randn(1, 1, n, 3)
    delta = CompressiveMemory(1, delta=True, feature=lambda x: x)
    linear = CompressiveMemory(1, delta=False, feature=lambda x: x)
    s_delta = delta.write(keys, values, MemoryState.zeros(1, 1, d, 3))
    s_linear = linear.write(keys, values, MemoryState.zeros(1, 1, d, 3))
    again = delta.write(keys, values, s_delta)
    assert torch.allclose(again.M, s_delta.M, atol=1e-6)  # nothing new to store
    assert torch.allclose(linear.write(keys, values, s_linear).M, 2 * s_linear.M)  # linear adds it again
    # A new value for a key: the delta rule moves M by the difference only.
    changed = values.clone()
    changed[..., 0, :] += 1.0
    moved = delta.write(keys[..., :1, :], changed[..., :1, :], s_delta)
    assert torch.allclose(
        moved.M - s_delta.M, torch.outer(torch.eye(d)[0], torch.ones(3))[None, None], atol=1e-6
    )


def test_the_straight_through_gate_is_hard_forward_and_soft_backward() -> None:
    soft = torch.tensor([0.2, 0.7, 0.5], requires_grad=True)
    hard = straight_through(soft)
    assert hard.tolist() == [0.0, 1.0, 0.0]
    (hard * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert soft.grad is not None and soft.grad.tolist() == [1.0, 2.0, 3.0]


def test_the_mix_starts_halfway_and_follows_beta() -> None:
    mem = CompressiveMemory(2)
    a_mem, a_dot = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    assert torch.allclose(mem.mix(a_mem, a_dot), torch.full((1, 2, 3, 4), 0.5))
    with torch.no_grad():
        mem.beta.copy_(torch.tensor([10.0, -10.0]))
    out = mem.mix(a_mem, a_dot)
    assert out[0, 0].min() > 0.99 and out[0, 1].max() < 0.01


def test_state_bytes_count_m_and_z() -> None:
    assert MemoryState.zeros(2, 3, 8, 5).bytes() == 4 * (2 * 3 * 8 * 5 + 2 * 3 * 8)


def test_the_memory_stays_float32_under_a_bf16_model_and_a_row_gate_closes_a_segment() -> None:
    mem = CompressiveMemory(2)
    state = MemoryState.zeros(1, 2, 4, 4)
    k, v = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16), torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)
    written = mem.write(k, v, state)
    assert written.M.dtype == torch.float32 and mem.retrieve(k, written).dtype == torch.bfloat16
    closed = mem.write(k, v, written, gate=torch.zeros(1))  # one gate for the row's whole segment
    assert torch.equal(closed.M, written.M) and torch.equal(closed.z, written.z)
