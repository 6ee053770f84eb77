"""FLARE's training and evaluation samples over a prepared folder, as Med3DVLM's FLARE recipe builds them.

* :class:`FlareReportDataset`: every case with findings once: the FLARE report prompt, the
  serialised findings (``"{region}: {text}"`` lines) as the answer.
* :class:`FlareVQADataset`: every case with questions once: in training the global question with
  probability 0.5 (always when it has no chains), else one random chain (a root and its direct
  children in JSON order, as the original trains and asks them); in evaluation the global question,
  else the first chain. Global: ``question.rstrip()`` plus `` Choices: `` and Python's ``str()`` of
  the choice list when it has one; the answer is the answer labels joined by ``", "``. Chains: lines
  ``"{k}. {question}"`` (with the same choices suffix) and answers ``"{k}. {answer}"``.

The original's training mixture visits every case once as a report sample and once as a VQA sample
per epoch (``ConcatDataset`` of the two).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from med3dvlm.data.datasets import OnError, SkipLog, StringColumn, VLMDataset, VolumeReader
from med3dvlm.data.errors import DataError
from med3dvlm.data.prepared import read_manifest
from med3dvlm.data.prompts import FLARE_REPORT_SYSTEM, FLARE_REPORT_USER, FLARE_VQA_SYSTEM, PromptBuilder
from med3dvlm.data.releases.flare.layout import serialise_findings
from med3dvlm.data.releases.flare.plan import PREFIX

GLOBAL, CHAIN = "global", "local_chain"


def read_cases(data_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The prepared case records of ``split`` (train: the training JSONs; validation and test: val.json)."""
    manifest = read_manifest(data_dir) or {}
    stems = (manifest.get("flare") or {}).get("splits", {}).get(split)
    if stems is None:
        raise DataError(
            f"{data_dir}/manifest.json",
            "not a prepared FLARE folder (no flare.splits): prepare one with "
            "`python -m med3dvlm.prepare dataset=flare`",
        )
    cases: list[dict[str, Any]] = []
    for stem in stems:
        path = os.path.join(data_dir, PREFIX, f"{stem}.json")
        try:
            with open(path, encoding="utf-8") as handle:
                cases += json.load(handle)
        except (OSError, ValueError) as exc:
            raise DataError(path, f"unreadable case records ({type(exc).__name__}: {exc})") from exc
    return cases


def with_choices(question: str, choices: list[str] | None) -> str:
    """``question.rstrip()``, with `` Choices: `` and the list as Python prints it when there is one."""
    text = question.rstrip()
    return f"{text} Choices: {choices}" if choices else text


def chain(questions: list[dict[str, Any]], root: dict[str, Any]) -> list[dict[str, Any]]:
    """A root question and its direct children, in the JSON's order (how the original asks a chain)."""
    return [root, *(q for q in questions if q["follow_up"] == root["id"])]


def roots(questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [q for q in questions if q["follow_up"] == -1]


def chain_text(members: list[dict[str, Any]]) -> tuple[str, str]:
    """The numbered question lines and answer lines of a chain."""
    asked = "\n".join(
        f"{k}. {with_choices(q['question'], q.get('choices'))}" for k, q in enumerate(members, 1)
    )
    answered = "\n".join(f"{k}. {q['answer']}" for k, q in enumerate(members, 1))
    return asked, answered


def global_text(case: dict[str, Any]) -> tuple[str, str]:
    """The first global question of a case and its answer labels joined by ``", "``."""
    question = case["global_vqa"][0]
    answer = question["answer"]
    return with_choices(question["question"], question.get("choices")), ", ".join(answer) if isinstance(
        answer, list
    ) else answer


class _FlareDataset(VLMDataset):
    """Cases of a prepared FLARE folder's split that ``keep`` admits; prompts in the FLARE format."""

    varies_question = True

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        prompts: PromptBuilder,
        volumes: VolumeReader,
        on_error: OnError = "fail",
        skip_log: SkipLog | None = None,
        prompt_only: bool = False,
        limit: int | None = None,
        random_question: bool = False,
    ) -> None:
        super().__init__(data_dir, split, prompts, volumes, on_error, skip_log, prompt_only)
        self.cases = [case for case in read_cases(data_dir, split) if self.keep(case)][:limit]
        self.images = StringColumn([case["image"] for case in self.cases])
        self.random_question = random_question

    def keep(self, case: dict[str, Any]) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.cases)

    def image_path(self, index: int) -> str:
        return self.images[index]

    def source(self, index: int) -> str:
        return f"{self.data_dir / PREFIX} (case {self.cases[index]['case_id']})"


class FlareReportDataset(_FlareDataset):
    """Region-structured report generation."""

    task = "flare_report"

    def keep(self, case: dict[str, Any]) -> bool:
        return bool(case.get("findings"))

    def prompt(self, question: str, separator: str) -> str:
        return self.prompts.report()

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        return "", "", serialise_findings(self.cases[index]["findings"]), "", "report"


class FlareVQADataset(_FlareDataset):
    """The global question or one question chain of each case (module docstring)."""

    task = "flare_vqa"

    def keep(self, case: dict[str, Any]) -> bool:
        return bool(case.get("global_vqa")) or bool(roots(case.get("local_vqa", [])))

    def prompt(self, question: str, separator: str) -> str:
        return self.prompts.vqa(question)

    def text(self, index: int) -> tuple[str, str, str, str, str]:
        case = self.cases[index]
        questions = case.get("local_vqa", [])
        starts = roots(questions)
        if self.random_question:
            rng: np.random.Generator = self.rng()
            use_global = bool(case.get("global_vqa")) and (not starts or rng.random() < 0.5)
            root = starts[int(rng.integers(len(starts)))] if starts and not use_global else None
        else:
            use_global = bool(case.get("global_vqa"))
            root = None if use_global else starts[0]
        if use_global:
            question, answer = global_text(case)
            return question, "", answer, "", GLOBAL
        question, answer = chain_text(chain(questions, root))
        return question, "", answer, str(root["id"]), CHAIN


def corpus_texts(root: os.PathLike | str) -> list[str]:
    """Every report, question, choice and answer text of a prepared FLARE folder, and the prompts'
    words (for the demo's tokenizers), deduplicated in a fixed order."""
    texts: dict[str, None] = dict.fromkeys([FLARE_REPORT_SYSTEM, FLARE_REPORT_USER, FLARE_VQA_SYSTEM])
    for case in [case for split in ("train", "validation") for case in read_cases(root, split)]:
        texts[serialise_findings(case.get("findings") or {})] = None
        for question in case.get("global_vqa", []):
            texts.update(dict.fromkeys(global_text({"global_vqa": [question]})))
        questions = case.get("local_vqa", [])
        for root_question in roots(questions):
            texts.update(dict.fromkeys(chain_text(chain(questions, root_question))))
    return [text for text in texts if text]
