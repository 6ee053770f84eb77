"""The single prompt builder: image block + question, then the answer, in a model's prompt format.

``m3d`` (M3D / Med3DVLM): the original builds ``image_tokens + question`` for captions and
``image_tokens + " " + question`` for VQA. ``flare`` (Med3DVLM's FLARE 2025 recipe): chat prompts
rendered with the LLM's chat template, a system turn and a user turn; a report prompt is the image
block followed by the rendered conversation, a VQA prompt carries the image block inside the user
turn, followed by a space and the question (:func:`flare_report_prompt`, :func:`flare_vqa_prompt`).

Both tokenise ``prompt + " " + answer`` with the EOS after the last answer token. Here the prompt and
the answer are tokenised separately (``tokens(prompt) + tokens(" " + answer) + [eos]``) so the
prompt/answer boundary is exact; labels are -100 on the prompt and padding. Released weights were
trained on these texts, so keep them unless you retrain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# M3D's caption questions (LaMed ``cap_prompt``); the first is the fixed evaluation question.
CAPTION_QUESTIONS: tuple[str, ...] = (
    "Can you provide a caption consists of findings for this medical image?",
    "Describe the findings of the medical image you see.",
    "Please caption this medical scan with findings.",
    "What is the findings of this image?",
    "Describe this medical scan with findings.",
    "Please write a caption consists of findings for this image.",
    "Can you summarize with findings the images presented?",
    "Please caption this scan with findings.",
    "Please provide a caption consists of findings for this medical image.",
    "Can you provide a summary consists of findings of this radiograph?",
    "What are the findings presented in this medical scan?",
    "Please write a caption consists of findings for this scan.",
    "Can you provide a description consists of findings of this medical scan?",
    "Please caption this medical scan with findings.",
    "Can you provide a caption consists of findings for this medical scan?",
)
CAPTION_SEPARATOR = ""  # image block directly followed by the caption question
VQA_SEPARATOR = " "  # image block, a space, then the VQA question
ANSWER_SEPARATOR = " "  # prompt, a space, then the answer


PROMPT_FORMATS: tuple[str, ...] = ("m3d", "flare")
# FLARE's report prompt (Med3DVLM FLARE_2025, prompt "simple"), split as the original splits it: the
# system message is the text up to the first full stop, the user message the rest, which starts with a
# space and ends with a newline and eight spaces. The released weights were trained on exactly this.
FLARE_REPORT_SYSTEM = "You are an AI assistant trained to act as an abdominal radiologist."
FLARE_REPORT_USER = " Please describe in detail the findings in this abdomen CT scan.\n        "
FLARE_VQA_SYSTEM = (
    "You are an AI assistant acting as a radiologist tasked with answering a multiple-choice "
    "question based on a CT scan."
)


def check_prompt_format(prompt_format: str | None) -> str:
    """``prompt_format`` if it is one of :data:`PROMPT_FORMATS` (``None``: ``m3d``)."""
    name = prompt_format or "m3d"
    if name not in PROMPT_FORMATS:
        raise ValueError(f"prompt format {name!r}: one of {PROMPT_FORMATS}")
    return name


def _chat(tokenizer: PreTrainedTokenizerBase, system: str, user: str) -> str:
    """The conversation rendered by the tokenizer's chat template, without a generation prompt (the
    original's call)."""
    if not tokenizer.chat_template:
        raise ValueError("the FLARE prompt format needs the LLM's chat template (its tokenizer has none)")
    return tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": user}], tokenize=False
    )


def flare_report_prompt(tokenizer: PreTrainedTokenizerBase, image_token: str, num_image_tokens: int) -> str:
    """The image block, then the rendered report conversation."""
    return image_token * num_image_tokens + _chat(tokenizer, FLARE_REPORT_SYSTEM, FLARE_REPORT_USER)


def flare_vqa_prompt(
    tokenizer: PreTrainedTokenizerBase, image_token: str, num_image_tokens: int, question: str
) -> str:
    """The rendered VQA conversation, its user turn the image block, a space and the question."""
    return _chat(tokenizer, FLARE_VQA_SYSTEM, image_token * num_image_tokens + " " + question)


def caption_question(rng: np.random.Generator | None = None) -> str:
    """A caption question: random from the template list, or the first one when ``rng`` is None."""
    if rng is None:
        return CAPTION_QUESTIONS[0]
    return CAPTION_QUESTIONS[int(rng.integers(len(CAPTION_QUESTIONS)))]


def closed_question(question: str, choices: Sequence[str]) -> str:
    """``"<question> Choices: A. a B. b C. c D. d"``."""
    if len(choices) != 4:
        raise ValueError(f"a closed question needs 4 choices, got {len(choices)}")
    return "{} Choices: A. {} B. {} C. {} D. {}".format(question, *choices)


def closed_answer(letter: str, text: str) -> str:
    """``"<letter>. <text>"``, e.g. ``"B. Liver"``."""
    return f"{letter}. {text}"


def build_prompt(
    image_token: str, num_image_tokens: int, question: str, separator: str = VQA_SEPARATOR
) -> str:
    """``image_token * num_image_tokens + separator + question``."""
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    return image_token * num_image_tokens + separator + question


def ask_prompt(
    tokenizer: PreTrainedTokenizerBase,
    image_token: str,
    num_image_tokens: int,
    question: str | None = None,
    prompt_format: str | None = "m3d",
) -> str:
    """The prompt a user's question is asked with (``infer``, the web page) in ``prompt_format``: the
    VQA prompt, or with ``question=None`` the report prompt (M3D: the first caption question, as
    captions were trained)."""
    prompts = PromptBuilder(tokenizer, image_token, num_image_tokens, prompt_format=prompt_format)
    return prompts.report() if question is None else prompts.vqa(question)


@dataclass(frozen=True)
class TokenizedExample:
    """``input_ids`` and ``labels`` of one example (``labels`` is None in prompt-only mode)."""

    input_ids: list[int]
    labels: list[int] | None
    truncated: bool = False


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    answer: str | None,
    max_length: int,
    image_token: str,
    num_image_tokens: int,
) -> TokenizedExample:
    """Token ids of ``prompt`` (+ answer + EOS), labels -100 except the answer and the EOS.

    ``answer=None`` is prompt-only mode (generation). Too long: the answer is cut (and then has no
    EOS, as in the original), never the prompt; a prompt that leaves no room for one answer token
    raises ``ValueError``. The image block must tokenise to exactly ``num_image_tokens`` ids.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    count = sum(1 for t in prompt_ids if t == image_id)
    if count != num_image_tokens:
        raise ValueError(
            f"the prompt holds {count} {image_token!r} tokens after tokenisation, expected "
            f"{num_image_tokens}; add {image_token!r} to the tokenizer as a special token"
        )
    if answer is None:
        if len(prompt_ids) > max_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens exceeds max_length={max_length}")
        return TokenizedExample(prompt_ids, None)
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(
            f"image block + question take {len(prompt_ids)} tokens, leaving no room for the answer "
            f"within max_length={max_length}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token")
    answer_ids = list(tokenizer(ANSWER_SEPARATOR + answer, add_special_tokens=False)["input_ids"])
    answer_ids.append(tokenizer.eos_token_id)
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    return TokenizedExample(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, truncated)


@dataclass(frozen=True)
class PromptBuilder:
    """Prompt + tokenisation settings of one model: tokenizer, image token string and count, max length."""

    tokenizer: PreTrainedTokenizerBase
    image_token: str = "<im_patch>"
    num_image_tokens: int = 256
    max_length: int = 512
    prompt_format: str | None = "m3d"

    def prompt(self, question: str, separator: str = VQA_SEPARATOR) -> str:
        """The M3D layout: the image block, ``separator``, the question."""
        return build_prompt(self.image_token, self.num_image_tokens, question, separator)

    def report(self, rng: np.random.Generator | None = None) -> str:
        """The prompt a report is asked with in this format (M3D: a caption question, random with
        ``rng``, else the first)."""
        if check_prompt_format(self.prompt_format) == "flare":
            return flare_report_prompt(self.tokenizer, self.image_token, self.num_image_tokens)
        return self.prompt(caption_question(rng), CAPTION_SEPARATOR)

    def vqa(self, question: str) -> str:
        """The prompt a question is asked with in this format."""
        if check_prompt_format(self.prompt_format) == "flare":
            return flare_vqa_prompt(self.tokenizer, self.image_token, self.num_image_tokens, question)
        return self.prompt(question, VQA_SEPARATOR)

    def tokenize(self, prompt: str, answer: str | None) -> TokenizedExample:
        return tokenize_example(
            self.tokenizer, prompt, answer, self.max_length, self.image_token, self.num_image_tokens
        )
