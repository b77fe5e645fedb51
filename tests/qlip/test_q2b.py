"""Q2B's probabilities against the paper's formulas, forced-high steps, STE gradients."""

import pytest
import torch

from qlip.methods.qlip import Q2B, Q2BConfig, expected_bits_ste

BITS = {"pq": (8, 32), "pq_ph": (8, 16, 32), "pq_pm": (8, 16, 32), "full": (8, 16, 32),
        "four": (6, 8, 16, 32)}


def _hand_set(variant: str, force: str = "high", high_steps: int = 1) -> Q2B:
    q2b = Q2B(units=3, steps=6, config=Q2BConfig(BITS[variant], variant, group_steps=2,
                                                  high_steps=high_steps, force=force))
    with torch.no_grad():
        q2b.s.copy_(torch.tensor([2.0, -1.0, 0.5]))
        q2b.o.copy_(torch.tensor([0.1, 0.3, -0.7]))
        q2b.m_logit.copy_(torch.tensor([[0.2, -0.4, 1.0], [0.5, 0.0, -1.5], [-2.0, 1.2, 0.3]]))
        q2b.h_logit.copy_(torch.tensor([[-0.3, 0.8, 0.1], [1.1, -0.6, 0.4], [0.0, 2.0, -1.0]]))
    return q2b


def _paper(variant, q, s, o, pm, ph):
    pq = torch.sigmoid((q - 0.5) * s + o)
    return {
        "pq": [1 - pq, pq],
        "pq_ph": [1 - pq, pq * (1 - ph), pq * ph],
        "pq_pm": [(1 - pq) * (1 - pm), (1 - pq) * pm, pq],
        "full": [(1 - pq) * (1 - pm), (1 - pq) * pm + pq * (1 - ph), pq * ph],
        "four": [(1 - pq) * (1 - pm), (1 - pq) * pm, pq * (1 - ph), pq * ph],
    }[variant]


@pytest.mark.parametrize("variant", sorted(BITS))
def test_probabilities_equal_the_papers_formulas(variant):
    q2b = _hand_set(variant)
    q = torch.tensor([0.1, 0.8])
    probs = q2b.probabilities(q, torch.arange(6))  # [S, n, U, J]
    assert probs.shape == (6, 2, 3, len(BITS[variant]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(6, 2, 3))
    for step in range(1, 6):  # step 0 is forced high
        group = step // 2
        pm, ph = torch.sigmoid(q2b.m_logit[group]), torch.sigmoid(q2b.h_logit[group])
        for i in range(2):
            want = torch.stack(_paper(variant, q[i], q2b.s, q2b.o, pm, ph), -1)
            torch.testing.assert_close(probs[step, i], want.detach())


@pytest.mark.parametrize("variant", sorted(BITS))
def test_forced_steps_are_high(variant):
    q2b = _hand_set(variant, high_steps=3)
    bits = q2b.bits(torch.tensor([0.0, 0.5, 1.0]), torch.arange(6))
    assert (bits[:3] == BITS[variant][-1]).all()
    assert (bits[3:] != BITS[variant][-1]).any()  # the later steps are not all high


def test_force_p_q_sets_p_q_to_one_only():
    q2b = _hand_set("full", force="p_q", high_steps=2)
    probs = q2b.probabilities(torch.tensor([0.0]), torch.tensor([0, 1]))
    ph = torch.sigmoid(q2b.h_logit[0]).detach()
    torch.testing.assert_close(probs[0, 0], torch.stack([0 * ph, 1 - ph, ph], -1))


def test_ste_gradients_reach_s_o_pm_ph():
    q2b = _hand_set("full", high_steps=0)
    probs = q2b.probabilities(torch.tensor([0.2, 0.9]), torch.tensor([3]))
    values = torch.tensor([1.0, 2.0, 3.0])
    hard = torch.nn.functional.one_hot(probs.argmax(-1), 3).float()
    mixed = hard.detach() - probs.detach() + probs  # the units' straight-through pattern
    ((mixed * values).sum() + expected_bits_ste(q2b, probs).sum()).backward()
    for name in ("s", "o", "m_logit", "h_logit"):
        grad = getattr(q2b, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert q2b.m_logit.grad[0].abs().sum() == 0  # step 3 is group 1: group 0 gets nothing
    hard_bits = expected_bits_ste(q2b, probs.detach())
    assert set(hard_bits.flatten().tolist()) <= {8.0, 16.0, 32.0}


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="needs 3 bit"):
        Q2BConfig((8, 16), "full")
    with pytest.raises(ValueError, match="rising"):
        Q2BConfig((16, 8, 32))
    with pytest.raises(ValueError, match="variant"):
        Q2BConfig(variant="bogus")
