"""Answer scoring and logit fidelity metrics of ``infercache.bench.metrics``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from infercache.bench.metrics import (
    GreedyMatch,
    contains_match,
    exact_match,
    fidelity_text,
    greedy_token_match,
    kl_divergence,
    normalize_text,
    recall_match,
    top1_agreement,
)



@pytest.fixture(scope="module")
def tiny_tokenizer():
    from infercache.models import load

    return load("tiny-random-llama")[1]


# ------------------------------------------------------------------------------------------ answers


def test_normalize_text_folds_case_and_whitespace():
    assert normalize_text("  The  Pass\nKEY\tis ") == "the pass key is"


def test_contains_match_needs_whole_numbers_and_words():
    assert contains_match(" 71432.", ["71432"]) == 1.0
    assert contains_match("The pass key is 71432", "71432") == 1.0
    assert contains_match(" 714321.", ["71432"]) == 0.0  # a longer number is not the answer
    assert contains_match(" 171432", ["71432"]) == 0.0
    assert contains_match("it is Glass\n  Bells!", ["glass bells"]) == 1.0
    assert contains_match("nothing here", ["a", "b"]) == 0.0
    assert contains_match("b", ["a", "b"]) == 1.0


def test_exact_match_ignores_case_spacing_and_final_period():
    assert exact_match("  71432. ", ["71432"]) == 1.0
    assert exact_match("Blue   Cheese", "blue cheese") == 1.0
    assert exact_match("71432 and more", ["71432"]) == 0.0


def test_recall_match_counts_the_fraction_found():
    answers = ["11111", "22222", "33333", "44444"]
    assert recall_match("11111, 33333", answers) == 0.5
    assert recall_match("44444 22222 11111 33333", answers) == 1.0
    assert recall_match("none", answers) == 0.0
    assert recall_match("VAR ABCDE, VAR fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)


def test_scoring_rejects_missing_answers():
    with pytest.raises(ValueError, match="no reference answers"):
        recall_match("x", [])
    with pytest.raises(ValueError, match="empty answer"):
        contains_match("x", [""])


# ----------------------------------------------------------------------------------------- fidelity


def test_kl_is_zero_for_identical_logits():
    logits = torch.randn(2, 7, 50, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(logits, logits.clone()) == 0.0


def test_kl_matches_a_hand_computed_value():
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0]])  # P = (0.5, 0.5) at both positions
    test = torch.tensor([[math.log(0.9), math.log(0.1)], [0.0, 0.0]], dtype=torch.float64)  # Q = (0.9, 0.1), then P
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert kl_divergence(ref, test) == pytest.approx(expected / 2, rel=1e-9)  # mean over 2 positions


def test_kl_is_positive_asymmetric_and_stable_for_large_logits():
    ref = torch.tensor([[1e4, 0.0, -1e4]])
    test = torch.tensor([[0.0, 1e4, -1e4]])
    value = kl_divergence(ref, test)
    assert math.isfinite(value) and value > 1e3
    a, b = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    assert kl_divergence(a, b) > 0 and kl_divergence(a, b) != pytest.approx(kl_divergence(b, a))
    assert kl_divergence(np.array([[2.0, 0.0]]), np.array([[2.0, 0.0]])) == 0.0  # numpy input works


def test_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="logit shapes differ"):
        kl_divergence(torch.zeros(3, 10), torch.zeros(3, 11))


def test_top1_agreement_on_hand_built_logits():
    ref = torch.tensor([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [0.0, 1.0, 5.0], [5.0, 0.0, 1.0]])
    test = torch.tensor([[4.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 9.0, 5.0], [1.0, 0.0, 0.0]])
    assert top1_agreement(ref, test) == 0.75
    assert top1_agreement(ref, ref) == 1.0


def test_greedy_token_match_identical_and_divergent():
    assert greedy_token_match([1, 2, 3], [1, 2, 3]) == GreedyMatch(1.0, None, 3)
    diverged = greedy_token_match([1, 2, 3, 4], [1, 2, 9, 4])
    assert diverged.first_divergence == 2
    assert diverged.match_fraction == 0.75  # positions keep being compared after the divergence


def test_greedy_token_match_counts_missing_positions_and_accepts_tensors():
    short = greedy_token_match(torch.tensor([[5, 6, 7, 8]]), torch.tensor([5, 6]))
    assert short == GreedyMatch(0.5, 2, 4)
    longer = greedy_token_match([5, 6], [5, 6, 7])
    assert longer.first_divergence == 2 and longer.match_fraction == 1.0
    assert greedy_token_match([], []).first_divergence is None
    with pytest.raises(ValueError, match="one sequence"):
        greedy_token_match(torch.zeros(2, 3, dtype=torch.long), [0, 0, 0])


def test_fidelity_text_is_deterministic_natural_text():
    first = fidelity_text(2000, seed=1)
    assert first == fidelity_text(2000, seed=1)
    assert first != fidelity_text(2000, seed=2)
    assert 1800 < len(first) <= 2000
    assert first.split()[0] and not any(ch.isdigit() for ch in first)


def test_fidelity_text_in_tokens(tiny_tokenizer):
    text = fidelity_text(tokenizer=tiny_tokenizer, n_tokens=300, seed=0)
    n_tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 280 <= n_tokens <= 300
    with pytest.raises(ValueError, match="needs a tokenizer"):
        fidelity_text(n_tokens=10)
