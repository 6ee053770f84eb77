"""GREEN (Ostmeier et al.) without the ``green_score`` package, which pins Python 3.12.1 and torch 2.2.

A judge LLM compares a candidate radiology report with a reference and writes, in a fixed format,
the counts of clinically significant and insignificant errors in six categories (a)-(f) and the
number of matched findings. GREEN = matched / (matched + significant errors); 0 when nothing is
matched; insignificant errors do not count. This module reproduces the package's prompt
(:func:`green_prompt`), chat rendering (:func:`render_judge_input`), answer clean-up
(:func:`clean_response`), parsing (:func:`parse_counts`) and score (:func:`green_score`) and runs a
local judge folder (:class:`GreenJudge`) the way the package does: left padding with pad = EOS,
greedy decoding, ``max_length`` 2048 tokens in total (prompt included), batches of 8.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SIGNIFICANT = "Clinically Significant Errors"
INSIGNIFICANT = "Clinically Insignificant Errors"
MATCHED = "Matched Findings"
CATEGORIES: tuple[str, ...] = (SIGNIFICANT, INSIGNIFICANT, MATCHED)
SUB_CATEGORIES: tuple[str, ...] = (
    "(a) False report of a finding in the candidate",
    "(b) Missing a finding present in the reference",
    "(c) Misidentification of a finding's anatomic location/position",
    "(d) Misassessment of the severity of a finding",
    "(e) Mentioning a comparison that isn't in the reference",
    "(f) Omitting a comparison detailing a change from a prior study",
)
GREEN_MAX_WORDS = 300
GREEN_BATCH_SIZE = 8
GREEN_MAX_LENGTH = 2048

# Data, not code: GREEN's evaluation prompt, character for character (the judges were trained on
# it; 1855 characters when rendered with "{REF}" and "{CAND}"). Only .format() it.
GREEN_PROMPT = (
    "Objective: Evaluate the accuracy of a candidate radiology report in comparison to a "
    "reference radiology report composed by expert radiologists.\n"
    "\n"
    "    Process Overview: You will be presented with:\n"
    "\n"
    "    1. The criteria for making a judgment.\n"
    "    2. The reference radiology report.\n"
    "    3. The candidate radiology report.\n"
    "    4. The desired format for your assessment.\n"
    "\n"
    "    1. Criteria for Judgment:\n"
    "\n"
    "    For each candidate report, determine:\n"
    "\n"
    "    The count of clinically significant errors.\n"
    "    The count of clinically insignificant errors.\n"
    "\n"
    "    Errors can fall into one of these categories:\n"
    "\n"
    "    a) False report of a finding in the candidate.\n"
    "    b) Missing a finding present in the reference.\n"
    "    c) Misidentification of a finding's anatomic location/position.\n"
    "    d) Misassessment of the severity of a finding.\n"
    "    e) Mentioning a comparison that isn't in the reference.\n"
    "    f) Omitting a comparison detailing a change from a prior study.\n"
    "    Note: Concentrate on the clinical findings rather than the report's writing style. "
    "Evaluate only the findings that appear in both reports.\n"
    "\n"
    "    2. Reference Report:\n"
    "    {reference}\n"
    "\n"
    "    3. Candidate Report:\n"
    "    {candidate}\n"
    "\n"
    "    4. Reporting Your Assessment:\n"
    "\n"
    "    Follow this specific format for your output, even if no errors are found:\n"
    "    ```\n"
    "    [Explanation]:\n"
    "    <Explanation>\n"
    "\n"
    "    [Clinically Significant Errors]:\n"
    "    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "    ....\n"
    "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "\n"
    "    [Clinically Insignificant Errors]:\n"
    "    (a) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "    ....\n"
    "    (f) <Error Type>: <The number of errors>. <Error 1>; <Error 2>; ...; <Error n>\n"
    "\n"
    "    [Matched Findings]:\n"
    "    <The number of matched findings>. <Finding 1>; <Finding 2>; ...; <Finding n>\n"
    "    ```\n"
)

# Data: the chat template GREEN sets on the judge's tokenizer, byte for byte.
GREEN_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['from'] == 'human' %}\n"
    "{{ '<|user|>\n' + message['value'] + eos_token }}\n"
    "{% elif message['from'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['value'] + eos_token }}\n"
    "{% elif message['from'] == 'gpt' %}\n"
    "{{ '<|assistant|>\n'  + message['value'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


def green_prompt(reference: str, candidate: str, max_words: int = GREEN_MAX_WORDS) -> str:
    """The judge prompt; each report is cut to its first ``max_words`` whitespace-separated words
    and rejoined with single spaces (so newlines become spaces even in short reports)."""
    return GREEN_PROMPT.format(
        reference=" ".join(reference.split()[:max_words]), candidate=" ".join(candidate.split()[:max_words])
    )


def render_judge_input(prompt: str, tokenizer: Any = None, eos_token: str = "</s>") -> str:
    """The prompt as GREEN hands it to the tokenizer: a human turn, an empty gpt turn and the
    generation prompt, i.e. ``<|user|>\\n{prompt}{eos}\\n<|assistant|>\\n{eos}\\n<|assistant|>\\n``.

    With a tokenizer, :data:`GREEN_CHAT_TEMPLATE` is rendered by its ``apply_chat_template`` (and
    its EOS token is used); without one, the same string is formatted directly."""
    if tokenizer is None:
        return f"<|user|>\n{prompt}{eos_token}\n<|assistant|>\n{eos_token}\n<|assistant|>\n"
    messages = [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]
    return tokenizer.apply_chat_template(
        messages, chat_template=GREEN_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )


def clean_response(text: str) -> str:
    """The judge's answer from the decoded sequence (GREEN's ``clean_responses``).

    When ``[Explanation]:`` occurs, the text after the last ``<|assistant|>`` is kept, then of
    that the text after the last ``[Explanation]:``; but when it holds the template's indented
    ``"[Explanation]:\\n    <Explanation>\\n"``, the text between the first and the second
    ``[Explanation]:`` (GREEN means to test the unindented spelling too, but its ``(a or b) in r``
    tests only ``a``). Then the text after the last ``<|assistant|>``, without ``</s>``/``<unk>``."""
    if "[Explanation]:" in text:
        text = text.split("<|assistant|>")[-1]
        part = 1 if "[Explanation]:\n    <Explanation>\n" in text else -1
        text = text.split("[Explanation]:")[part]
    text = text.split("<|assistant|>")[-1]
    return text.replace("</s>", "").replace("<unk>", "")


def _section(text: str, category: str) -> str | None:
    """The text after ``[category]:`` and its following whitespace, up to a blank line (one that
    holds only whitespace counts) or the end."""
    match = re.search(rf"\[{category}\]:\s*(.*?)(?:\n\s*\n|\Z)", text, re.DOTALL)
    return match.group(1) if match else None


def parse_counts(text: str, category: str) -> tuple[int, list[int]]:
    """``(total, [a, b, c, d, e, f])`` for an error category, ``(matched, [0] * 6)`` for
    ``Matched Findings``, as GREEN's ``parse_error_counts``.

    A missing section, or one starting with ``"No"`` (``No``, ``None.``, ``Not ...``, also
    ``Nodule ...``), gives zeros. Matched = the integer that opens the section when a ``.``
    follows it directly. Error lines are ``(a) ...`` to ``(f) ...`` (a space after the
    parenthesis), or ``(1) ...`` to ``(6) ...`` when no lettered line exists; lines are sorted
    as strings and the last line of a letter wins; its count is the first integer that follows
    ``": "`` and is followed by ``"."`` (0 when there is none)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown GREEN category {category!r}; expected one of {CATEGORIES}")
    counts = [0] * len(SUB_CATEGORIES)
    body = _section(text, category)
    if body is None or body.startswith("No"):
        return 0, counts
    if category == MATCHED:
        found = re.findall(r"^\b\d+\b(?=\.)", body)
        return (int(found[0]) if found else 0), counts
    lines, labels = sorted(re.findall(r"\([a-f]\) .*", body)), "abcdef"
    if not lines:
        lines, labels = sorted(re.findall(r"\([1-6]\) .*", body)), "123456"
    for position, label in enumerate(labels):
        for line in lines:
            found = re.findall(r"(?<=: )\b\d+\b(?=\.)", line) if line.startswith(f"({label}) ") else []
            if found:
                counts[position] = int(found[0])
    return sum(counts), counts


def green_score(response: str) -> float:
    """matched / (matched + clinically significant errors); 0.0 when no finding is matched."""
    matched, _ = parse_counts(response, MATCHED)
    if matched == 0:
        return 0.0
    significant, _ = parse_counts(response, SIGNIFICANT)
    return matched / (matched + significant)


class GreenJudge:
    """A local GREEN judge folder (e.g. a download of ``StanfordAIMI/GREEN-radllama2-7b``).

    Loaded with ``transformers`` only from the folder (no network, no remote code), left padding,
    pad = EOS; ``dtype`` defaults to float16 on CUDA (GREEN's) and float32 elsewhere. GREEN loads
    its tokenizer with ``add_eos_token=True``, which puts one EOS after the rendered chat; it is
    appended here as text, which works for tokenizers without that option (on inputs longer
    than ``max_length`` truncation then cuts it, where GREEN's would keep it)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = GREEN_BATCH_SIZE,
        max_length: int = GREEN_MAX_LENGTH,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(model_path).is_dir():
            raise FileNotFoundError(
                f"GREEN judge {str(model_path)!r} is not a local folder: download the judge model "
                "(e.g. StanfordAIMI/GREEN-radllama2-7b) and pass its folder; nothing is fetched here"
            )
        self.device = torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path, local_files_only=True, trust_remote_code=False
        )
        self.tokenizer.padding_side = "left"
        self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.clean_up_tokenization_spaces = True
        dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model_path, dtype=dtype, local_files_only=True, trust_remote_code=False
            )
            .to(self.device)
            .eval()
        )

    @torch.inference_mode()
    def _answers(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        tok = self.tokenizer
        texts = [render_judge_input(green_prompt(ref, hyp), tok) + tok.eos_token for ref, hyp in pairs]
        batch = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
        outputs = self.model.generate(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            max_length=self.max_length,
            do_sample=False,
            temperature=None,
            top_p=None,
        )
        # GREEN decodes the whole sequence, prompt included; clean_response cuts the prompt off.
        return [clean_response(text) for text in tok.batch_decode(outputs, skip_special_tokens=True)]

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, str]]:
        """``(GREEN, cleaned answer)`` for each ``(reference, candidate)`` pair, in order."""
        results: list[tuple[float, str]] = []
        for start in range(0, len(pairs), self.batch_size):
            answers = self._answers(pairs[start : start + self.batch_size])
            results.extend((green_score(answer), answer) for answer in answers)
        return results
