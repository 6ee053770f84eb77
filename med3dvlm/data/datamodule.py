"""``M3DDataModule``: the prepared M3D data as train / val / test loaders for every stage.

Mixtures: ``retrieval`` (image + report, SigLIP), ``pretrain`` (caption + closed + open VQA),
``finetune`` (+ yes/no VQA), or one task alone (``caption``, ``closed_vqa``, ``open_vqa``,
``yes_no_vqa``). Training shuffles and augments; validation and test use the fixed caption
question and no augmentation. Benchmark generation (``med3dvlm.evaluation``) reads prompt-only
datasets of any CSV of the folder itself, left-padded and resumable.
Under DDP, Lightning swaps in a ``DistributedSampler`` (disjoint shards per rank).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from med3dvlm.data.collate import PadCollate
from med3dvlm.data.datasets import M3DDataset, OnError, RetrievalDataset, SkipLog, VolumeReader
from med3dvlm.data.errors import DataError
from med3dvlm.data.prepared import dataset_preprocessing, read_manifest
from med3dvlm.data.preprocess import Preprocessing
from med3dvlm.data.prompts import IGNORE_INDEX, PromptBuilder
from med3dvlm.data.releases import RELEASES
from med3dvlm.data.releases.base import Release
from med3dvlm.data.transforms import Augmentation

log = logging.getLogger(__name__)

STAGE_MIXTURES: tuple[str, ...] = ("retrieval", "pretrain", "finetune")


def release_of(data_dir: str | os.PathLike) -> Release:
    """The release a prepared folder holds (its manifest's ``dataset``; M3D for a folder without one)."""
    manifest = read_manifest(data_dir) or {}
    return RELEASES[str(manifest.get("dataset") or "m3d")]


def mixture_tasks(release: Release, mixture: str) -> tuple[str, ...]:
    """The tasks of ``mixture`` on ``release``'s data: a stage's mixture, or one task alone."""
    if mixture in release.mixtures:
        return release.mixtures[mixture]
    if mixture in release.tasks or mixture == "retrieval":
        return (mixture,)
    raise ValueError(
        f"mixture {mixture!r}: {release.name} data has {sorted({*release.mixtures, *release.tasks})}"
    )


def load_tokenizer(
    tokenizer: PreTrainedTokenizerBase | str, image_token: str | None
) -> PreTrainedTokenizerBase:
    """A tokenizer object as given, or ``AutoTokenizer`` from a path; ``image_token`` is added as a
    special token when missing (the VLM adds the same token, so the ids agree)."""
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    if image_token is not None and image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    return tokenizer


class M3DDataModule(L.LightningDataModule):
    """Datasets, augmentation, tokenisation and dynamic-padding loaders over a prepared folder.

    ``tokenizer``: the LLM tokenizer (VLM mixtures) or the text encoder's (retrieval), an object or
    a path. ``*_subset`` caps each task's dataset of that split to its first N samples.
    ``on_error="skip"`` lists skipped samples in ``skip_file``.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        mixture: str = "finetune",
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        image_token: str = "<im_patch>",
        num_image_tokens: int = 256,
        max_length: int = 512,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: bool = True,
        augmentation: Mapping[str, float] | None = None,
        spatial_size: Sequence[int] | None = (128, 256, 256),
        on_error: OnError = "fail",
        skip_file: str | os.PathLike | None = None,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if mixture not in (*STAGE_MIXTURES, *(t for r in RELEASES.values() for t in r.tasks)):
            raise ValueError(f"unknown mixture {mixture!r}")
        if spatial_size is not None and len(spatial_size) != 3:
            raise ValueError(f"spatial_size must be (D, H, W), got {spatial_size}")
        self.data_dir = data_dir
        self.mixture = mixture
        self.tokenizer_source = tokenizer
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augmentation = Augmentation(**(augmentation or {})) if augment else None
        self.spatial_size = tuple(spatial_size) if spatial_size is not None else None
        self.on_error = on_error
        self.skip_log = SkipLog(skip_file)
        self.subsets = {"train": train_subset, "validation": val_subset, "test": test_subset}
        self.pin_memory = pin_memory
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.datasets: dict[str, Dataset] = {}

    @property
    def preprocessing(self) -> Preprocessing | None:
        """What the folder's volumes went through (its manifest), recorded in every export."""
        return dataset_preprocessing(self.data_dir)

    @property
    def prompt_format(self) -> str:
        """How this data's prompts are written (recorded in the VLM stages' exports)."""
        return release_of(self.data_dir).prompt_format

    @property
    def retrieval(self) -> bool:
        return self.mixture == "retrieval"

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            if self.tokenizer_source is None:
                raise ValueError("M3DDataModule has no tokenizer: set data.tokenizer or pass the model's")
            self._tokenizer = load_tokenizer(
                self.tokenizer_source, None if self.retrieval else self.image_token
            )
        return self._tokenizer

    def build(self, split: str, train: bool = False) -> Dataset:
        """The mixture's dataset of ``split`` (a ``ConcatDataset`` for several tasks)."""
        volumes = VolumeReader(self.spatial_size, self.augmentation if train else None)
        common = {"on_error": self.on_error, "skip_log": self.skip_log, "limit": self.subsets[split]}
        parts: list[M3DDataset] = []
        release = release_of(self.data_dir)
        for task in mixture_tasks(release, self.mixture):
            absent = release.tasks[task].absence(self.data_dir, split) if task in release.tasks else None
            if absent:
                log.info(
                    "the %s mixture of split %r has no %s samples: %s", self.mixture, split, task, absent
                )
                continue
            if task == "retrieval":
                parts.append(
                    RetrievalDataset(self.data_dir, split, self.tokenizer, volumes, self.max_length, **common)
                )
                continue
            prompts = PromptBuilder(
                self.tokenizer,
                self.image_token,
                self.num_image_tokens,
                self.max_length,
                release.prompt_format,
            )
            cls = release.tasks[task]
            extra = {"random_question": train} if cls.varies_question else {}
            parts.append(cls(self.data_dir, split, prompts, volumes, **common, **extra))
        if not parts:
            raise DataError(self.data_dir, f"the {self.mixture} mixture has no samples in split {split!r}")
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.datasets.setdefault("train", self.build("train", train=True))
        if stage in (None, "fit", "validate"):
            self.datasets.setdefault("validation", self.build("validation"))
        if stage in (None, "test"):
            self.datasets.setdefault("test", self.build("test"))

    def collate(self) -> PadCollate:
        pad = self.tokenizer.pad_token_id
        if pad is None:  # many causal LMs ship without a pad token; padded positions are masked anyway
            pad = self.tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
        return PadCollate(pad)

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        if name not in self.datasets:
            self.setup({"train": "fit", "validation": "validate"}.get(name, name))
        return DataLoader(
            self.datasets[name],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=self.collate(),
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # Each iterator draws a worker base seed: from its own generator (seeded by the run's seed),
            # not the global RNG, so a validation does not shift the random draws of the training after it.
            generator=torch.Generator().manual_seed(torch.initial_seed()),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def summary(self, split: str = "train") -> str:
        """Shapes, dtypes and the decoded text of the first batch of ``split``'s loader."""
        loader = {
            "train": self.train_dataloader,
            "validation": self.val_dataloader,
            "test": self.test_dataloader,
        }[split]()
        batch = next(iter(loader))
        out = io.StringIO()
        out.write(f"{split} batch of mixture {self.mixture!r} ({len(loader.dataset)} samples)\n")
        for key, value in batch.items():
            if hasattr(value, "shape"):
                extra = f" range [{value.min():.3f}, {value.max():.3f}]" if key == "image" else ""
                out.write(f"  {key:15s} {tuple(value.shape)} {value.dtype}{extra}\n")
            else:
                out.write(f"  {key:15s} list[{type(value[0]).__name__}] x {len(value)}\n")
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
        text = self.tokenizer.decode(ids)
        block = self.image_token * self.num_image_tokens
        out.write(f"  text[0]:   {text.replace(block, f'{self.image_token} x {self.num_image_tokens}')!r}\n")
        if "labels" in batch:
            target = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
            out.write(f"  target[0]: {self.tokenizer.decode(target)!r}\n")
        return out.getvalue()
