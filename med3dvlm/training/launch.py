"""Processes started by a launcher agree on what they train before they train it.

Under ``torchrun`` on each node or ``srun``, every process composes its own config from its own
command line, reads its own checkout of the code and its own view of the data. A node started with
another override, another code version or another copy of the data would train something else, or
hang in a collective once its steps stop matching the others'. :func:`agree_across_processes`
starts the process group as the strategy would in ``fit`` (which then finds it started), has every
process publish a fingerprint of what it is about to train in the group's key-value store and waits
a bounded time for all of them: every process then fails with the same message, naming each setting
that differs and the ranks holding each value (or the ranks that never reported), before the first
collective of training.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig

import med3dvlm
from med3dvlm.data.prepared import MANIFEST_FILE, caption_file
from med3dvlm.training.resume_guard import resolved_values
from med3dvlm.utils.fingerprint import file_sha256

# Settings that may differ between the processes of one launch: where the code is checked out (its
# content is compared as the code version) and the loggers (only global rank 0 logs).
PER_PROCESS_KEYS = ("paths.root_dir", "logger")
# After the process group has started every process is alive, and each reaches the check within
# seconds; a process that has not reported by then is running something else.
AGREEMENT_TIMEOUT = timedelta(minutes=5)
_ROUNDS = itertools.count()  # one exchange per training job of this process (a multirun has several)


class LaunchMismatch(RuntimeError):
    """The processes of one launch were started with different settings, code or data."""


def flat_settings(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``dotted.key -> JSON value`` for every leaf of a plain config tree."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flat_settings(value, f"{name}."))
        else:
            flat[name] = json.dumps(value, sort_keys=True, default=str)
    return flat


def code_version() -> str:
    """This package's version and a digest of its sources, with the torch and Lightning versions."""
    package = Path(med3dvlm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return (
        f"med3dvlm {med3dvlm.__version__} (sources {digest.hexdigest()[:12]}), "
        f"torch {torch.__version__}, lightning {L.__version__}"
    )


def data_version(data_dir: str | os.PathLike) -> str:
    """The prepared folder's manifest and split file, by SHA-256 (each names every volume it uses)."""
    files = [Path(data_dir) / MANIFEST_FILE, caption_file(data_dir)]
    return ", ".join(
        f"{file.name} {file_sha256(file)[:12] if file.is_file() else 'missing'}" for file in files
    )


def launch_fingerprint(cfg: DictConfig) -> dict[str, str]:
    """What this process is about to train: its resolved settings (without ``PER_PROCESS_KEYS``),
    the code version (``code``) and the prepared data (``data``)."""
    settings = flat_settings(resolved_values(cfg))
    fingerprint = {
        key: value
        for key, value in settings.items()
        if not any(key == k or key.startswith(f"{k}.") for k in PER_PROCESS_KEYS)
    }
    fingerprint["code"] = code_version()
    fingerprint["data"] = data_version(cfg.data.data_dir)
    return fingerprint


def _short(value: str, limit: int = 120) -> str:
    return value if len(value) <= limit else f"{value[: limit - 3]}..."


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def disagreements(fingerprints: Sequence[Mapping[str, str]]) -> list[str]:
    """``key: value on ranks ...; other value on ranks ...`` for every key whose value differs."""
    lines = []
    for key in sorted(set().union(*fingerprints)):
        holders: dict[str, list[int]] = {}
        for rank, fingerprint in enumerate(fingerprints):
            holders.setdefault(fingerprint.get(key, "<absent>"), []).append(rank)
        if len(holders) > 1:
            lines.append(f"{key}: " + "; ".join(f"{_short(v)} on {_ranks(r)}" for v, r in holders.items()))
    return lines


def exchange_fingerprints(
    store: dist.Store,
    rank: int,
    world_size: int,
    fingerprint: Mapping[str, str],
    namespace: str,
    timeout: timedelta = AGREEMENT_TIMEOUT,
) -> list[dict[str, str]]:
    """Publish ``fingerprint`` under ``namespace`` and return every rank's, in rank order (read in
    full only where the digests differ). Raises :class:`LaunchMismatch` naming the ranks that did not
    publish within ``timeout``."""
    text = json.dumps(fingerprint, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    store.set(f"{namespace}/full/{rank}", text)
    store.set(f"{namespace}/digest/{rank}", digest)
    keys = [f"{namespace}/digest/{r}" for r in range(world_size)]
    try:
        store.wait(keys, timeout)
    except dist.DistError as error:
        absent = [r for r, key in enumerate(keys) if not store.check([key])]
        raise LaunchMismatch(
            f"{_ranks(absent)} of {world_size} did not report what they train within "
            f"{timeout.total_seconds():.0f} s: started with another code version or process count, "
            f"or failed before this check (see their log) ({error})"
        ) from error
    digests = [value.decode() for value in store.multi_get(keys)]
    if len(set(digests)) == 1:
        return [dict(fingerprint)] * world_size
    # Only now the fingerprints themselves, one per distinct digest.
    distinct: dict[str, dict[str, str]] = {}
    for r, value in enumerate(digests):
        if value not in distinct:
            distinct[value] = json.loads(store.get(f"{namespace}/full/{r}"))
    return [distinct[value] for value in digests]


def start_process_group(strategy: Strategy) -> bool:
    """Start the strategy's process group now, as it would at the start of ``fit`` (same backend,
    timeout and device), for processes a launcher started (``torchrun``, ``srun``, any cluster
    environment Lightning detects); ``fit`` then finds it started. ``False`` where there is none to
    start: a single process, or processes that Lightning itself starts from this one (they share its
    command line and files)."""
    environment = getattr(strategy, "cluster_environment", None)
    # LightningEnvironment: Lightning's own launcher, whose children (but not their parent) look
    # externally started; every process must take the same path here.
    if environment is None or isinstance(environment, LightningEnvironment):
        return False
    if not environment.creates_processes_externally:
        return False
    if strategy.num_nodes * strategy.num_processes < 2:
        return False
    # Public on DDPStrategy, private on ModelParallelStrategy (FSDP2Strategy).
    setup = getattr(strategy, "setup_distributed", None) or getattr(strategy, "_setup_distributed", None)
    if setup is None:
        return False
    setup()
    return dist.is_initialized()


def agree_across_processes(
    cfg: DictConfig, trainer: L.Trainer, timeout: timedelta = AGREEMENT_TIMEOUT
) -> None:
    """For processes a launcher started: raise :class:`LaunchMismatch` on every process unless all
    of them train the same settings, code and data (see the module docstring)."""
    if not start_process_group(trainer.strategy):
        return
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # A client of the store the group was started with (Lightning exported its address to start it).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout=timeout)
    # torchrun keeps one store across the restarts of its workers, and a multirun trains several jobs.
    namespace = f"med3dvlm/launch/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_ROUNDS)}"
    fingerprints = exchange_fingerprints(store, rank, world_size, launch_fingerprint(cfg), namespace, timeout)
    differences = disagreements(fingerprints)
    if differences:
        listing = "\n  ".join(differences)
        run_folder = any(line.startswith("paths.output_dir:") for line in differences)
        raise LaunchMismatch(
            f"the {world_size} processes of this launch disagree on what they train:\n  {listing}\n"
            "Start every node with the same command line, code version and prepared data "
            "(outputs and data on storage every node sees, or identical copies)"
            + (
                ": name the run folder (hydra.run.dir=), its default is each node's start time."
                if run_folder
                else "."
            )
        )
