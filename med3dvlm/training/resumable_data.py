"""A training DataLoader that resumes mid-epoch: same order, consumed batches skipped.

Lightning restores its loop counters from a checkpoint but restarts a plain DataLoader at the
start of the epoch (repeating seen batches, never reaching the rest). Here the order is a function
of ``(seed, epoch)`` only, and the loader's ``state_dict`` (which Lightning stores in every
checkpoint for loaders that have one) records how many batches of which epoch were handed out;
a restored loader skips those batches' indices without loading them. Each sample's random draws
(augmentation) come from a generator seeded by ``(seed, epoch, index)`` (:class:`SeededSamples`),
so a resumed epoch augments exactly as the uninterrupted one did, with any number of workers.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
)


class EpochRandomSampler(RandomSampler):
    """A permutation seeded by ``seed + epoch`` (``set_epoch`` is called by Lightning each epoch),
    so the order does not depend on how much of the global RNG earlier code consumed. A
    ``RandomSampler`` so that under DDP Lightning swaps in its seeded ``DistributedSampler``."""

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class EpochSequentialSampler(SequentialSampler):
    """In-order sampling that knows its epoch (for the resume bookkeeping)."""

    def __init__(self, data_source: Any) -> None:
        super().__init__(data_source)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class SeededSamples(Dataset):
    """``dataset`` read by ``(epoch, index)`` keys: a part that can take its own generator
    (``sample(index, rng)``, the M3D datasets) draws its augmentation from one seeded by
    ``(seed, epoch, index)``, so the draws are the same in a resumed run as in the uninterrupted
    one, whichever worker loads the sample. Other parts are read as usual."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        part, local = self.dataset, index
        while isinstance(part, ConcatDataset):
            which = bisect.bisect_right(part.cumulative_sizes, local)
            local -= part.cumulative_sizes[which - 1] if which else 0
            part = part.datasets[which]
        if hasattr(part, "sample"):
            return part.sample(local, np.random.default_rng([self.seed, epoch, index]))
        return part[local]


class _SkipFirst:
    """The loader's batch sampler without the batches a restored loader already served."""

    def __init__(self, batches: Any, loader: ResumableDataLoader) -> None:
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        # A generator: runs at the first next(), after Lightning has set the sampler's epoch.
        skip = self.loader._start_epoch()
        epoch = self.loader._epoch()
        for index, batch in enumerate(self.batches):
            if index >= skip:
                yield [(epoch, i) for i in batch]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with Lightning's ``state_dict``/``load_state_dict`` protocol.

    Takes exactly ``DataLoader``'s arguments so Lightning can rebuild it with a distributed sampler.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._restored: dict[str, int] | None = None

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def _start_epoch(self) -> int:
        state, self._restored = self._restored, None
        skip = 0
        if state is not None and state["epoch"] == self._epoch() and state["served"] < len(self):
            skip = state["served"]
        self._served = skip
        return skip

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored = {"epoch": int(state["epoch"]), "served": int(state["served"])}


def resumable(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` rebuilt as a :class:`ResumableDataLoader` with an epoch-seeded order (shuffled if
    ``loader`` shuffled). Loaders with a custom sampler, batch sampler or an iterable dataset are
    returned unchanged: their order is theirs to make resumable."""
    if (
        isinstance(loader, ResumableDataLoader)
        or type(loader.sampler) not in (RandomSampler, SequentialSampler)
        or type(loader.batch_sampler) is not BatchSampler
    ):
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    dataset = SeededSamples(loader.dataset, seed)
    sampler = EpochRandomSampler(dataset, seed) if shuffle else EpochSequentialSampler(dataset)
    # Its own generator: creating the iterator each epoch draws a worker base seed, which would
    # otherwise come from the global RNG and shift every random draw after an epoch boundary in an
    # uninterrupted run but not in one resumed there.
    return ResumableDataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
        multiprocessing_context=loader.multiprocessing_context,
    )


class RestoreLoaderPosition(L.Callback):
    """Hands the train loader its saved position at train start.

    Lightning 2.6 passes a stateful loader its state only when it builds the loader after the
    checkpoint is restored; a stage whose ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches`` (any per-step schedule) makes it build the loader
    before, and the saved position would be dropped. Loading twice is harmless: Lightning clears
    the pending states once applied.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()


def make_training_data_resumable(datamodule: L.LightningDataModule, seed: int) -> L.Callback:
    """Wrap ``datamodule.train_dataloader`` so that its loader goes through :func:`resumable`;
    returns the :class:`RestoreLoaderPosition` callback the trainer needs for it.

    Done on the instance (any datamodule works unchanged); the loader is still built inside
    Lightning's hook call, so Lightning records its arguments and can re-create it under DDP.
    """
    build = datamodule.train_dataloader

    def train_dataloader() -> DataLoader:
        return resumable(build(), seed)

    datamodule.train_dataloader = train_dataloader
    return RestoreLoaderPosition()
