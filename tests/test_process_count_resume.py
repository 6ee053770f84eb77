"""Resume on another process count: the loaders of every rank, as Lightning builds them (a
``DistributedSampler`` per rank beyond one process), stopped mid-epoch and restored with another
count, serve each remaining sample of the epoch once; the config check lets the count change."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from med3dvlm.training.resumable_data import EpochLayout, ResumableDataLoader, resumable
from med3dvlm.training.resume_guard import config_differences

SEED = 3
EPOCH = 1
LOGGER = "med3dvlm.training.resumable_data"


def rank_loaders(size: int, processes: int, batch_size: int) -> list[ResumableDataLoader]:
    """Every rank's training loader over samples ``0..size-1``: one process keeps the epoch-seeded
    sampler; more get Lightning's seeded ``DistributedSampler`` (Lightning seeds it with the run's seed)."""
    one = resumable(DataLoader(list(range(size)), batch_size=batch_size, shuffle=True), seed=SEED)
    if processes == 1:
        return [one]
    return [
        ResumableDataLoader(
            one.dataset,
            batch_size=batch_size,
            sampler=DistributedSampler(
                one.dataset, num_replicas=processes, rank=rank, shuffle=True, seed=SEED
            ),
        )
        for rank in range(processes)
    ]


def serve(loaders: list[ResumableDataLoader], steps: int | None = None) -> list[list[list[int]]]:
    """Each rank's batches of ``EPOCH`` as sample lists: the first ``steps``, or to the end."""
    served = []
    for loader in loaders:
        loader.sampler.set_epoch(EPOCH)
        served.append([batch.tolist() for batch in itertools.islice(loader, steps)])
    return served


def samples(batches: list[list[list[int]]]) -> list[int]:
    return [i for rank in batches for batch in rank for i in batch]


@pytest.mark.parametrize(
    ("size", "before", "after", "batch_size", "steps"),
    [
        (22, 2, 1, 2, 3),  # 2 -> 1: 12 of 22 served, the rest in batches of 2
        (22, 1, 2, 2, 7),  # 1 -> 2: 14 served, 8 left: two steps of 2 x 2
        (23, 1, 2, 2, 4),  # 1 -> 2: 15 left: the last step (3 samples) deals 2 + 1
        (21, 1, 2, 4, 5),  # 1 -> 2: 1 left, fewer than the processes: left out
        (30, 2, 4, 3, 2),  # 2 -> 4: 18 left, 12 + 6
        (30, 4, 2, 3, 1),  # 4 -> 2: 18 left, 6 + 6 + 6
        (29, 4, 2, 2, 2),  # 4 -> 2: 13 left, 4 + 4 + 5 (the last 1 joins the step before)
    ],
)
def test_a_resume_on_another_process_count_serves_every_remaining_sample_once(
    size, before, after, batch_size, steps, caplog
):
    first = rank_loaders(size, before, batch_size)
    served = serve(first, steps)
    states = [loader.state_dict() for loader in first]
    assert all(state == states[0] for state in states)  # every rank records the same global position
    assert states[0]["samples"] == steps * before * batch_size

    resumed = rank_loaders(size, after, batch_size)
    for loader in resumed:
        loader.load_state_dict(states[0])
    position = resumed[0].resume_position(EPOCH)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rest = serve(resumed)
    (warning,) = [r.getMessage() for r in caplog.records if "per-step batches differ" in r.getMessage()]
    assert f"with {after} process(es) x {batch_size} samples a step" in warning  # once, not per rank
    remaining = size - states[0]["samples"]
    if (
        remaining < after
    ):  # nothing can be dealt to every process: the epoch ends, the log says what is left out
        assert rest == [[] for _ in range(after)] and position == len(resumed[0])
        return
    # Equal step counts on every rank (no rank waits in a collective), no empty batch, and Lightning's
    # count of the epoch continues where these batches end it.
    assert len({len(batches) for batches in rest}) == 1 and all(len(b) > 0 for r in rest for b in r)
    assert position + len(rest[0]) == len(resumed[0])
    assert Counter(samples(served) + samples(rest)) == Counter(range(size))  # each sample exactly once


def test_a_checkpoint_of_a_re_dealt_epoch_resumes_it_exactly_on_the_same_count(caplog):
    first = rank_loaders(22, 2, 2)
    serve(first, 3)
    moved = rank_loaders(22, 1, 2)[0]
    moved.load_state_dict(first[0].state_dict())
    moved.sampler.set_epoch(EPOCH)
    batches = iter(moved)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        head = [next(batches).tolist() for _ in range(2)]
    assert "per-step batches differ" in caplog.text
    checkpoint = moved.state_dict()
    assert checkpoint["samples"] == 12 + 4 and checkpoint["start"] == 12
    tail = [batch.tolist() for batch in batches]

    again = rank_loaders(22, 1, 2)[0]
    again.load_state_dict(checkpoint)
    assert again.resume_position(EPOCH) is None  # the same count: Lightning's own count is right
    assert serve([again])[0] == tail and len(head + tail) == 5  # 10 remaining samples, 2 a step


def test_a_sampler_layout_counts_steps_and_samples_as_distributed_sampler_deals():
    layout = EpochLayout(size=22, processes=4, batch_size=2)
    assert layout.steps() == 3  # 6 per process after padding to 24
    assert [layout.samples_after(k) for k in range(4)] == [0, 8, 16, 22]
    rest = EpochLayout(size=22, processes=4, batch_size=2, start=13)
    assert rest.bounds() == [13, 22] and rest.left_out() == 0  # 9 left: 8 + 1 -> one step of 9
    assert [len(batch) for rank in range(4) for batch in rest.deal(list(range(22)), rank)] == [3, 2, 2, 2]
    assert EpochLayout(22, 4, 2, start=19).left_out() == 3  # 3 left, 4 processes


def test_a_resume_may_change_the_process_count_but_not_the_batch_size():
    original = {"trainer": {"devices": 2, "num_nodes": 2, "max_epochs": 1}, "data": {"batch_size": 4}}
    resumed = {"trainer": {"devices": 8, "num_nodes": 1, "max_epochs": 1}, "data": {"batch_size": 4}}
    assert config_differences(original, resumed) == []
    assert config_differences(original, {**resumed, "data": {"batch_size": 2}}) == ["data.batch_size: 4 -> 2"]


def test_a_state_without_a_sample_count_resumes_as_before():
    """Checkpoints written before the count: the same process count, the served batches skipped."""
    loader = rank_loaders(20, 1, 4)[0]
    loader.load_state_dict({"epoch": EPOCH, "served": 2})
    assert loader.resume_position(EPOCH) is None
    assert serve([loader])[0] == serve(rank_loaders(20, 1, 4))[0][2:]
