"""A training DataLoader that resumes mid-epoch: same order, consumed batches skipped.

Lightning restores its loop counters from a checkpoint but restarts a plain DataLoader at the
start of the epoch (repeating seen batches, never reaching the rest). Here the order is a function
of ``(seed, epoch)`` only, and the loader's ``state_dict`` (which Lightning stores in every
checkpoint for loaders that have one) records how many batches of which epoch were handed out;
a restored loader skips those batches' indices without loading them. Each sample's random draws
(augmentation) come from a generator seeded by ``(seed, epoch, index)`` (:class:`SeededSamples`),
so a resumed epoch augments exactly as the uninterrupted one did, with any number of workers.

The epoch's order is the same for every process count (one process draws the permutation that
``DistributedSampler`` deals out), so the state also records the position as a global sample
count. A run resumed with another process count or batch size serves the rest of the epoch from
there, each remaining sample once (:class:`EpochLayout`), in per-step batches that differ from the
uninterrupted run's (a warning says so); :class:`RestoreLoaderPosition` moves Lightning's batch
count of the epoch to match.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class EpochLayout:
    """How the ``size`` samples of an epoch are dealt to ``processes`` processes, ``batch_size``
    each per step, along the epoch's global order.

    ``start == 0``: the sampler's own layout. Step ``g`` serves the global positions
    ``[g * processes * batch_size, (g + 1) * processes * batch_size)``, each process every
    ``processes``-th of them (as ``DistributedSampler`` deals, padding the order with its first
    samples so that every process gets as many).

    ``start > 0``: the rest of an epoch begun with another process count or batch size, from global
    position ``start`` on, dealt the same way but never padded: a last step too small to give every
    process a sample joins the step before, so each remaining sample is served once (none at all
    when fewer remain than there are processes; ``left_out`` counts them).
    """

    size: int
    processes: int
    batch_size: int
    drop_last: bool = False
    start: int = 0

    def bounds(self) -> list[int]:
        """Where each step of a rest-of-epoch layout begins in the global order, then where the last ends."""
        width = self.processes * self.batch_size
        starts = list(range(self.start, self.size, width))
        end = self.size
        if starts and end - starts[-1] < width:
            if self.drop_last:
                end = starts.pop()
            elif end - starts[-1] < self.processes:
                starts.pop()
                end = end if starts else self.start
        return [*starts, end]

    def steps(self) -> int:
        """Batches per process."""
        if self.start == 0:
            per_process = -(-self.size // self.processes)
            return per_process // self.batch_size if self.drop_last else -(-per_process // self.batch_size)
        return len(self.bounds()) - 1

    def left_out(self) -> int:
        """Samples from ``start`` on that no step serves."""
        return 0 if self.start == 0 else self.size - self.bounds()[-1]

    def samples_after(self, steps: int) -> int:
        """The global sample count after ``steps`` steps (``size`` once the epoch is over)."""
        if steps >= self.steps():
            return self.size
        if self.start == 0:
            return steps * self.processes * self.batch_size
        return self.bounds()[steps]

    def deal(self, order: list[int], rank: int) -> list[list[int]]:
        """Process ``rank``'s batches of a rest-of-epoch layout, from the epoch's global ``order``."""
        bounds = self.bounds()
        return [order[a:b][rank :: self.processes] for a, b in itertools.pairwise(bounds)]


def epoch_order(sampler: Sampler) -> list[int]:
    """The current epoch's global sample order: a ``DistributedSampler``'s before it is padded and
    dealt (the permutation one process with the same seed draws), else the sampler's own."""
    if isinstance(sampler, DistributedSampler):
        whole = DistributedSampler(
            sampler.dataset, num_replicas=1, rank=0, shuffle=sampler.shuffle, seed=sampler.seed
        )
        whole.set_epoch(sampler.epoch)
        return list(whole)
    return list(sampler)


class _SkipFirst:
    """The loader's batch sampler without the batches a restored loader already served."""

    def __init__(self, batches: Any, loader: ResumableDataLoader) -> None:
        self.batches = batches
        self.loader = loader

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        # A generator: runs at the first next(), after Lightning has set the sampler's epoch.
        layout, served = self.loader._start_epoch()
        epoch = self.loader._epoch()
        if layout.start == 0:
            batches = itertools.islice(self.batches, served, None)
        else:
            rank = getattr(self.loader.sampler, "rank", 0)
            rest = layout.deal(epoch_order(self.loader.sampler), rank)
            batches = iter(rest[served - self.loader._offset(layout) :])
        for batch in batches:
            yield [(epoch, i) for i in batch]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with Lightning's ``state_dict``/``load_state_dict`` protocol.

    Takes exactly ``DataLoader``'s arguments so Lightning can rebuild it with a distributed sampler.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._layout: EpochLayout | None = None
        self._restored: dict[str, int] | None = None

    @property
    def _index_sampler(self) -> Any:
        return _SkipFirst(super()._index_sampler, self)

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def _native(self) -> EpochLayout:
        """This loader's own layout (``DistributedSampler``: as many processes as it deals to)."""
        processes = getattr(self.sampler, "num_replicas", 1)
        return EpochLayout(len(self.dataset), processes, self.batch_size, self.drop_last)

    def _offset(self, layout: EpochLayout) -> int:
        """How many of this epoch's batches (in this loader's count) come before ``layout``'s first."""
        return len(self) - layout.steps()

    def _plan(self, epoch: int) -> tuple[EpochLayout, int, bool]:
        """``(layout, batches served, moved)`` for ``epoch`` from the restored state: ``moved`` when
        it was written with another process count or batch size."""
        native, state = self._native(), self._restored
        if state is None or state["epoch"] != epoch:
            return native, 0, False
        saved = replace(
            native,
            processes=state.get("processes", native.processes),
            batch_size=state.get("batch_size", native.batch_size),
            start=state.get("start", 0),
        )
        if (saved.processes, saved.batch_size) == (native.processes, native.batch_size):
            return (saved, state["served"], False) if state["served"] < len(self) else (native, 0, False)
        if state["samples"] >= native.size:  # that epoch was over
            return native, len(self), True
        rest = replace(native, start=state["samples"])
        return rest, self._offset(rest), True

    def resume_position(self, epoch: int) -> int | None:
        """This loader's count of ``epoch``'s batches already served, when the restored state was
        written with another process count or batch size (Lightning's own count is in that
        layout's batches); ``None`` otherwise."""
        _, served, moved = self._plan(epoch)
        return served if moved else None

    def _start_epoch(self) -> tuple[EpochLayout, int]:
        epoch = self._epoch()
        layout, served, moved = self._plan(epoch)
        state, self._restored = self._restored, None
        if moved:
            assert state is not None
            left_out = layout.left_out()
            if getattr(self.sampler, "rank", 0) == 0:  # once per run, not once per process
                log.warning(
                    "resuming epoch %d at sample %d of %d with %d process(es) x %d samples a step (the "
                    "checkpoint was written with %d x %d): every remaining sample is served once, but the "
                    "per-step batches differ from the uninterrupted run's%s",
                    epoch,
                    state["samples"],
                    layout.size,
                    layout.processes,
                    layout.batch_size,
                    state["processes"],
                    state["batch_size"],
                    f"; {left_out} remaining samples are left out (fewer than the processes)"
                    if left_out
                    else "",
                )
        self._layout, self._served = layout, served
        return layout, served

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        layout = self._layout or self._native()
        return {
            "epoch": self._epoch(),
            "served": self._served,
            "samples": layout.samples_after(self._served - self._offset(layout)),
            "start": layout.start,
            "processes": layout.processes,
            "batch_size": layout.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._restored = {key: int(value) for key, value in state.items()}


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
    """Hands the train loader its saved position at train start, and moves Lightning's batch count of
    the epoch to the loader's when the checkpoint was written with another process count.

    Lightning 2.6 passes a stateful loader its state only when it builds the loader after the
    checkpoint is restored; a stage whose ``configure_optimizers`` reads
    ``trainer.estimated_stepping_batches`` (any per-step schedule) makes it build the loader
    before, and the saved position would be dropped. Loading twice is harmless: Lightning clears
    the pending states once applied. Lightning's count decides where the epoch ends and when it
    validates; after a change of process count it is in the checkpoint's batches, not this run's.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fit_loop = trainer.fit_loop
        fit_loop._load_combined_loader_states()
        epoch = fit_loop.epoch_progress.current.processed  # the epoch Lightning sets on the sampler next
        counts = fit_loop.epoch_loop.batch_progress.current
        for loader in fit_loop._combined_loader.flattened:
            position = loader.resume_position(epoch) if isinstance(loader, ResumableDataLoader) else None
            if position is not None:
                shift = position - counts.ready
                counts.ready += shift
                counts.started += shift
                counts.processed += shift
                counts.completed += shift


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
