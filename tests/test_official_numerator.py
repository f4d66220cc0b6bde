"""The published code's Eq. 7 (cggm-spec.md A3): ``diff_sum = sum(diff) + 1e-8; coeff = (diff_sum -
d) / diff_sum`` and the encoder gradients times ``coeff * rho``. Its guard is in the numerator too,
so when no classifier's metric changes B is rho for every encoder (the paper's formula gives 0).
``cggm_official`` uses the published formula; ``rule="paper"`` keeps the paper's."""

from __future__ import annotations

import pytest
import torch

from cggm.methods import CGGM, PaperRule, build_method


def published_coeffs(rho, accs, prev):
    """The official trainer's loop, transcribed in plain Python floats (float64)."""
    diff = [a - p for a, p in zip(accs, prev)]
    diff_sum = sum(diff) + 1e-8
    return [rho * (diff_sum - d) / diff_sum for d in diff]


def paper_eq7(rho, accs, prev):
    delta = [a - p for a, p in zip(accs, prev)]
    s = sum(delta)
    return [rho * (s - d) / (s + 1e-8) for d in delta]


SEQ = [  # batch accuracies of 32-sample batches: changes, a step where nothing changes, a cancelling step
    [0.5, 0.25, 0.375],
    [0.59375, 0.3125, 0.40625],
    [0.59375, 0.3125, 0.40625],  # no metric changes: every delta is 0
    [0.625, 0.28125, 0.40625],   # +1/32, -1/32, 0: the improvements cancel
    [0.5, 0.5, 0.5],
]


def test_official_formula_matches_the_published_loop():
    rho = 1.3
    rule = PaperRule(rho, formula="official")
    prev = [0.0] * 3  # epsilon^0 = 0
    for accs in SEQ:
        B = rule(torch.tensor(accs, dtype=torch.float64))
        expected = torch.tensor(published_coeffs(rho, accs, prev), dtype=torch.float32)
        assert torch.allclose(B, expected, rtol=1e-4, atol=1e-5), (accs, B, expected)
        prev = accs


def test_no_metric_change_gives_rho_for_every_encoder():
    rho = 1.3
    for M in (2, 3, 4):
        accs = [0.25 * (k + 1) for k in range(M)]
        official, paper = PaperRule(rho, formula="official"), PaperRule(rho)
        official(torch.tensor(accs))
        paper(torch.tensor(accs))
        B_official = official(torch.tensor(accs))  # the same metrics again: every delta 0
        B_paper = paper(torch.tensor(accs))
        assert torch.allclose(B_official, torch.full((M,), rho)), B_official
        assert torch.equal(B_paper, torch.zeros(M))  # the paper's formula as written: no update at all


def test_paper_rule_default_stays_the_papers_formula():
    rule = PaperRule(1.3)
    assert rule.formula == "paper"
    prev = [0.0] * 3
    for accs in SEQ:
        B = rule(torch.tensor(accs))
        assert torch.allclose(B, torch.tensor(paper_eq7(1.3, accs, prev), dtype=torch.float32), rtol=1e-4, atol=1e-5)
        prev = accs
    with pytest.raises(ValueError, match="formula"):
        PaperRule(1.3, formula="nope")


def test_cggm_official_uses_the_published_formula_and_cggm_paper_the_papers():
    official = build_method("cggm_official", rho=1.2)
    assert isinstance(official.rule, PaperRule) and official.rule.formula == "official"
    assert official.rule.rho == 1.2
    assert CGGM.official().rule.formula == "official"
    assert build_method("cggm_paper").rule.formula == "paper"
    # a rule the user names keeps the user's options
    assert CGGM.official(rule_options={"formula": "paper"}).rule.formula == "paper"
    assert CGGM.official(rule="robust").rule.name == "robust"
    # through the step: two batches with the same classifier metrics give B = rho
    B1, _ = official.rule.propose(torch.tensor([0.5, 0.75]))
    official.rule.accept(_)
    B2, _ = official.rule.propose(torch.tensor([0.5, 0.75]))
    assert torch.allclose(B2, torch.full((2,), 1.2))
