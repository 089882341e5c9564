"""BEM's write gate: its features mean what they say on constructed memories, and the gate is hard at
.7 forward, soft backward, closed for a token the memory holds and open for a new surprising one."""

from __future__ import annotations

import pytest
import torch

from bem.missions.mission_e import gate
from bem.missions.mission_e.memory import CompressiveMemory, MemoryState


def segment(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, 8, 4, generator=g), torch.randn(1, 2, 8, 4, generator=g)


def test_an_empty_memory_is_fully_novel_and_covers_nothing() -> None:
    mem = CompressiveMemory(2)
    k, v = segment(0)
    empty = MemoryState.zeros(1, 2, 4, 4)
    assert gate.novelty(k, empty, mem).shape == (1, 8)
    assert torch.allclose(gate.novelty(k, empty, mem), torch.ones(1, 8))
    assert torch.allclose(gate.coverage(k, v, empty, mem), torch.zeros(1, 8))


def test_a_segment_the_memory_holds_is_not_novel_and_is_covered() -> None:
    d = 4
    mem = CompressiveMemory(1, feature=lambda x: x)
    keys = torch.eye(d)[None, None]  # orthogonal features: the memory returns each value exactly
    values = torch.randn(1, 1, d, 3)
    held = mem.write(keys, values, MemoryState.zeros(1, 1, d, 3))
    assert torch.allclose(gate.coverage(keys, values, held, mem), torch.ones(1, d), atol=1e-6)
    other = torch.randn(1, 1, d, 3)
    assert (gate.coverage(keys, other, held, mem) < 0.5).all()
    # A key along z (what was written) is not novel; one orthogonal to everything written is.
    repeated = torch.ones(1, 1, 2, d)
    z_held = mem.write(repeated, torch.randn(1, 1, 2, 3), MemoryState.zeros(1, 1, d, 3))
    assert torch.allclose(gate.novelty(repeated, z_held, mem), torch.zeros(1, 2), atol=1e-6)
    first = torch.eye(d)[None, None, :1]
    only_first = mem.write(first, torch.randn(1, 1, 1, 3), MemoryState.zeros(1, 1, d, 3))
    assert gate.novelty(torch.eye(d)[None, None, 1:2], only_first, mem).item() == pytest.approx(1.0)


def test_the_gate_is_hard_at_point_seven_and_follows_its_features() -> None:
    wg = gate.WriteGate()
    novel, _ = wg(torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[0.0]]))
    known, soft_known = wg(torch.tensor([[0.0]]), torch.tensor([[0.1]]), torch.tensor([[1.0]]))
    assert novel.item() == 1.0 and known.item() == 0.0 and soft_known.item() < gate.THRESHOLD
    n = torch.tensor([[0.5]], requires_grad=True)
    g, soft = wg(n, torch.tensor([[0.5]]), torch.tensor([[0.5]]))
    g.sum().backward()
    assert n.grad is not None and n.grad.item() == pytest.approx((soft * (1 - soft)).item() * 2.0)


def test_a_gate_that_reads_the_code_needs_it() -> None:
    wg = gate.WriteGate(code_dim=3)
    with pytest.raises(ValueError, match="controller's code"):
        wg(torch.zeros(1, 5), torch.zeros(1, 5), torch.zeros(1, 5))
    g, _ = wg(torch.zeros(1, 5), torch.zeros(1, 5), torch.zeros(1, 5), code=torch.ones(1, 3))
    assert g.shape == (1, 5)
