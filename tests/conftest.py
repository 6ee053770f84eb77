"""Test-wide settings: offline, few threads, shared paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    # torch 2.13's oneDNN corrupts the heap in bf16 Conv3d with a 1x1x7 kernel at stride 4 (the
    # DCFormer stem) on CPUs with AMX; capping the ISA below AMX avoids that kernel (README
    # "Troubleshooting"). Read at the first oneDNN call, so setting it here covers every test.
    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_FP16",
}.items():
    os.environ.setdefault(_key, _value)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: a worker's own threads would oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no pool of compile processes

import med3dvlm.resolvers  # noqa: F401  (tests compose configs as the commands do)

REPO_ROOT = Path(__file__).resolve().parents[1]
LONGEST_FIRST = (
    "test_distributed_stages.py",
    "test_runs.py",
    "test_multinode.py",
    "test_app.py",
    "test_install.py",
    "test_prepare.py",
)
"""The files that take minutes on 2 cores, longest first: `make test`'s workers (pytest-xdist, one file
each at a time) take them first and share out the short files at the end. Distributed stages before
multinode: both read the references the first of them builds."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


REFERENCE_DIR = REPO_ROOT / "tests" / "data" / "reference"
REFERENCE_FILES = ("dcformer_nano.pt", "mixer_small.pt", "keys.json", "checkpoint_layouts.md")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``tests/data/reference``: the original implementation's test vectors (provenance in its README).
    They are part of the repository, so a missing one fails the tests rather than skipping them."""
    missing = [name for name in REFERENCE_FILES if not (REFERENCE_DIR / name).is_file()]
    if missing:
        pytest.fail(f"reference vectors missing from {REFERENCE_DIR}: {missing}")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def nltk_data(tmp_path_factory) -> Path:
    """The project's nltk_data folder (make nltk-data), else one assembled from Debian's WordNet, first
    on NLTK's data path (METEOR)."""
    from med3dvlm.metrics import nltk_setup

    if not nltk_setup.missing_nltk_data(nltk_setup.default_nltk_data()):
        return nltk_setup.use_nltk_data()
    try:
        folder = nltk_setup.setup_nltk_data(tmp_path_factory.mktemp("nltk_data"))
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"WordNet / punkt not installed (make nltk-data): {exc}")
    return nltk_setup.use_nltk_data(folder)


@pytest.fixture(scope="session")
def distributed_references(tmp_path_factory):
    """Every stage fitted in this process on fixed global batches: what the multi-process runs of
    ``test_distributed_stages`` and ``test_multinode`` are compared with (built once)."""
    from helpers.distributed import one_process_references, references_built_once

    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each pytest-xdist worker is a session of its own: the workers share one build.
        return references_built_once(tmp_path_factory.getbasetemp().parent / "distributed")
    return one_process_references(tmp_path_factory.mktemp("distributed"))
