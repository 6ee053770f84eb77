"""GREEN without its package: prompt, chat rendering, answer clean-up and parsing on judge answers
written here in GREEN's output format, and the judge loop on a tiny local causal LM."""

from __future__ import annotations

import hashlib

import pytest
import torch

from med3dvlm.metrics.green import (
    GREEN_PROMPT,
    INSIGNIFICANT,
    MATCHED,
    SIGNIFICANT,
    GreenJudge,
    clean_response,
    green_prompt,
    green_score,
    parse_counts,
    render_judge_input,
)
from med3dvlm.models.tiny_qwen import build_tiny_qwen, train_tokenizer

LETTERED = {
    "a": "(a) False report of a finding in the candidate",
    "b": "(b) Missing a finding present in the reference",
    "c": "(c) Misidentification of a finding's anatomic location/position",
    "d": "(d) Misassessment of the severity of a finding",
    "e": "(e) Mentioning a comparison that isn't in the reference",
    "f": "(f) Omitting a comparison detailing a change from a prior study",
}


def errors(**counts: str) -> str:
    """Six lettered lines; a letter's value is its ``<count>. <errors>`` text (default ``0.``)."""
    return "\n".join(f"{line}: {counts.get(letter, '0.')}" for letter, line in LETTERED.items())


# A full answer: 2 significant errors (b, c), 2 insignificant ones (not counted), 3 matched.
FULL_ANSWER = (
    "\nThe candidate misses the splenic lesion and puts the renal stone on the wrong side.\n\n"
    f"[Clinically Significant Errors]:\n{errors(b='1. Splenic hypodense lesion.', c='1. Stone side.')}\n\n"
    f"[Clinically Insignificant Errors]:\n{errors(a='2. Lobulated contour; Small cyst.')}\n\n"
    "[Matched Findings]:\n3. Normal liver; Normal pancreas; No ascites."
)


def test_prompt_is_greens_text():
    template = GREEN_PROMPT.format(reference="{REF}", candidate="{CAND}")
    # Length and digest of GREEN's make_prompt("{REF}", "{CAND}") (green_score 0.0.12 / GREEN d72c195).
    assert len(template) == 1855
    assert hashlib.sha256(template.encode()).hexdigest() == (
        "20e8af6880baefc7d610eebe6f7c7bde49564d25461c19d220ae3069051e256a"
    )
    assert template.startswith("Objective: Evaluate the accuracy") and template.endswith("    ```\n")


def test_green_prompt_truncates_and_collapses_whitespace():
    reference = "\n".join(f"w{i}" for i in range(305))
    prompt = green_prompt(reference, "  Liver\n\n normal. ")
    kept = " ".join(f"w{i}" for i in range(300))  # first 300 words, single spaces
    assert f"2. Reference Report:\n    {kept}\n\n    3. Candidate Report:\n    Liver normal.\n\n" in prompt
    assert "w300" not in prompt
    assert green_prompt("a b c", "d", max_words=2) == GREEN_PROMPT.format(reference="a b", candidate="d")


def test_chat_rendering_with_a_tokenizer():
    tokenizer = train_tokenizer(["the liver is normal", "no acute findings"], vocab_size=300)
    eos = tokenizer.eos_token
    prompt = green_prompt("Liver normal.", "Liver cyst.")
    expected = "<|user|>\n" + prompt + eos + "\n<|assistant|>\n" + eos + "\n<|assistant|>\n"
    assert render_judge_input(prompt, tokenizer) == expected
    assert render_judge_input(prompt, eos_token=eos) == expected
    assert render_judge_input("P") == "<|user|>\nP</s>\n<|assistant|>\n</s>\n<|assistant|>\n"


def test_clean_response():
    answer = "\nThe liver lesion is missed.\n\n[Matched Findings]:\n1. Normal spleen."
    prompt = render_judge_input(green_prompt("ref", "cand"))  # holds "[Explanation]:" and "<|assistant|>"
    # Decoded prompt + answer: the answer after the last <|assistant|> and after "[Explanation]:".
    assert clean_response(prompt + "[Explanation]:" + answer + "</s>") == answer
    # No "[Explanation]:" anywhere: only the text after the last <|assistant|>, tags removed.
    assert clean_response("<|user|>\nx<|assistant|>\n<unk>2. a</s>") == "\n2. a"
    # GREEN's quirk: when the answer echoes the template's indented "[Explanation]:\n    <Explanation>\n",
    # only the text between the first and second "[Explanation]:" is kept (it means to test the
    # unindented spelling too, which takes the text after the last one).
    echo = "[Explanation]:\n    <Explanation>\n\n[Explanation]:\nreal"
    assert clean_response(echo) == "\n    <Explanation>\n\n"
    unindented = "[Explanation]:\n<Explanation>\n\n[Explanation]:\nreal"
    assert clean_response(unindented) == "\nreal"


def test_full_answer():
    assert parse_counts(FULL_ANSWER, SIGNIFICANT) == (2, [0, 1, 1, 0, 0, 0])
    assert parse_counts(FULL_ANSWER, INSIGNIFICANT) == (2, [2, 0, 0, 0, 0, 0])
    assert parse_counts(FULL_ANSWER, MATCHED) == (3, [0] * 6)
    assert green_score(FULL_ANSWER) == 3 / (3 + 2)  # insignificant errors do not count
    with pytest.raises(ValueError, match="unknown GREEN category"):
        parse_counts(FULL_ANSWER, "Matched")


SIG = "[Clinically Significant Errors]:\n"
MATCHED_HEADER = "\n\n[Matched Findings]:\n"


@pytest.mark.parametrize(
    ("answer", "significant", "expected"),
    [
        # (1)-(6) fallback when no lettered line exists: a=2, d=1 -> 2 / (2 + 3).
        (
            SIG
            + "(1) False report of a finding: 2. Ascites; Splenomegaly.\n(4) Misassessment: 1. Grade."
            + MATCHED_HEADER
            + "2. Liver cyst; Gallstone.",
            [2, 0, 0, 1, 0, 0],
            0.4,
        ),
        # One lettered line disables the numbered ones: a=1 -> 1 / (1 + 1).
        (
            SIG + "(a) False report: 1. x.\n(2) Missing: 5. y." + MATCHED_HEADER + "1. z.",
            [1, 0, 0, 0, 0, 0],
            0.5,
        ),
        # Duplicate letters: lines are sorted, the last wins ("...: 4." sorts after "...: 2."), although
        # 2 comes last in the text -> 2 / (2 + 4).
        (
            SIG
            + "(a) False report: 4. w; x; y; z.\n(a) False report: 2. w; x."
            + MATCHED_HEADER
            + "2. a; b.",
            [4, 0, 0, 0, 0, 0],
            1 / 3,
        ),
        # A line of spaces ends the section: (b) is outside it -> 3 / (3 + 1).
        (SIG + "(a) X: 1. x.\n   \n(b) Y: 4. y." + MATCHED_HEADER + "3. a; b; c.", [1, 0, 0, 0, 0, 0], 0.75),
        # No blank line before the next header: the insignificant (a) line is read as significant
        # and sorts last -> 2 / (2 + 5).
        (
            SIG
            + "(a) X: 1. x.\n[Clinically Insignificant Errors]:\n(a) X: 5. y."
            + MATCHED_HEADER
            + "2. a; b.",
            [5, 0, 0, 0, 0, 0],
            2 / 7,
        ),
        # Counts need ": " before and "." after: "X:1." and "Y: 3" give 0, "(c)Z" is no line -> 1.0.
        (SIG + "(a) X:1. x.\n(b) Y: 3\n(c)Z: 2. z." + MATCHED_HEADER + "1. a.", [0] * 6, 1.0),
        # Header and items on one line (whitespace after the colon is skipped) -> 2 / (2 + 1).
        (
            "[Clinically Significant Errors]: (a) False report: 1. x.\n\n[Matched Findings]: 2. a; b",
            [1, 0, 0, 0, 0, 0],
            2 / 3,
        ),
        # A section starting with "No" has no errors, even "Nodular ..." followed by counts -> 4 / 4, 1 / 1.
        (SIG + "No clinically significant errors." + MATCHED_HEADER + "4. a; b; c; d.", [0] * 6, 1.0),
        (
            SIG + "Nodular liver falsely reported.\n(a) False report: 2. x; y." + MATCHED_HEADER + "1. a.",
            [0] * 6,
            1.0,
        ),
        # Missing significant section: no errors -> 2 / 2.
        ("[Matched Findings]:\n2. a; b.", [0] * 6, 1.0),
    ],
)
def test_parsing_and_score(answer, significant, expected):
    assert parse_counts(answer, SIGNIFICANT) == (sum(significant), significant)
    assert green_score(answer) == pytest.approx(expected)


@pytest.mark.parametrize(
    "matched_section",
    [
        "None.",  # starts with "No"
        "No matched findings.",
        "2 a; b",  # no "." after the number
        "Liver normal. 2. a; b.",  # the number must open the section
    ],
)
def test_no_matched_findings_scores_zero(matched_section):
    answer = f"[Clinically Significant Errors]:\n{errors()}\n\n[Matched Findings]:\n{matched_section}"
    assert parse_counts(answer, MATCHED) == (0, [0] * 6)
    assert green_score(answer) == 0.0


def test_missing_sections():
    assert green_score("") == 0.0  # nothing matched, even without errors
    assert parse_counts("", SIGNIFICANT) == (0, [0] * 6)
    assert green_score(f"[Clinically Significant Errors]:\n{errors(a='1. x.')}") == 0.0
    assert parse_counts("[Matched Findings]:\n  12. a.", MATCHED)[0] == 12  # leading whitespace skipped


def test_judge_refuses_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="StanfordAIMI/GREEN-radllama2-7b"):
        GreenJudge("StanfordAIMI/GREEN-radllama2-7b")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        GreenJudge(tmp_path / "absent")


def test_judge_on_a_tiny_model(tmp_path):
    corpus = [GREEN_PROMPT, FULL_ANSWER, "The liver is normal. A small cyst in the left kidney."]
    folder = build_tiny_qwen(
        tmp_path / "judge",
        corpus,
        vocab_size=600,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )
    pairs = [
        ("The liver is normal.", "The liver is normal."),
        ("A small cyst in the left kidney with a much longer description of it.", "No cyst."),
        ("Normal spleen.", "Enlarged spleen."),
    ]
    probe = GreenJudge(folder)
    tok = probe.tokenizer
    texts = [render_judge_input(green_prompt(r, c), tok) + tok.eos_token for r, c in pairs]
    lengths = [len(tok(text)["input_ids"]) for text in texts]
    # Room for 4 new tokens after the longest prompt (max_length counts the prompt, as in GREEN).
    judge = GreenJudge(folder, batch_size=2, max_length=max(lengths) + 4)
    calls = []
    generate = judge.model.generate

    def spy(**kwargs):
        calls.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask")})
        return generate(**kwargs)

    judge.model.generate = spy
    results = judge.judge(pairs)

    assert [c["input_ids"].shape[0] for c in calls] == [2, 1]  # batches of 2, then the rest
    first = calls[0]
    short = lengths.index(min(lengths[:2]))
    pad = max(lengths[:2]) - min(lengths[:2])
    assert pad > 0
    # Left padding with pad = EOS: the shorter prompt starts with `pad` masked EOS tokens.
    mask = first["attention_mask"][short]
    assert mask[:pad].sum() == 0 and bool(mask[pad:].all())
    assert torch.equal(first["input_ids"][short, :pad], torch.full((pad,), tok.eos_token_id))
    assert tok.pad_token_id == tok.eos_token_id
    assert len(results) == len(pairs)
    for score, answer in results:
        assert score == 0.0  # an untrained model writes no GREEN answer
        assert isinstance(answer, str) and "Objective:" not in answer  # the prompt is cut off
