"""Model folders on the Hugging Face Hub: push one (``python -m med3dvlm.export push_to_hub=ORG/NAME``)
and find one by its Hub id in the local Hugging Face cache (``load_pretrained("ORG/NAME")``).

Pushing is the one network call: ``huggingface_hub``'s own ``create_repo`` + ``upload_folder``, after
the folder has passed the checks a loader makes. Finding never downloads: a model is fetched into
the cache with ``hf download ORG/NAME``, and the cached snapshot is then an ordinary model folder,
loaded with the same checks as any other.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from med3dvlm.artifacts.record import read_record
from med3dvlm.models.sources import offline

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
"""``org/name``: how a Hub id differs from a path (a path that exists is always the path)."""


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a Hub model id rather than a folder here."""
    return not Path(name).exists() and HUB_ID.fullmatch(str(name)) is not None


def cached_model_folder(name: str | os.PathLike) -> Path:
    """``name`` itself, or for a Hub id the snapshot of its ``main`` revision in the local Hugging
    Face cache (``HF_HUB_CACHE``); a Hub id not in the cache is an error saying how to fetch it."""
    if not is_hub_id(name):
        return Path(name)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"{name}: neither a folder here nor a model in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"fetch it with `hf download {name}`, or give the folder's path"
        ) from error


def check_push(repo_id: str) -> None:
    """Fail early, before an export spends minutes merging, when ``repo_id`` cannot be pushed to: a
    malformed id, or the hub switched off."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    if offline():
        raise RuntimeError(
            f"push_to_hub={repo_id}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE or "
            "TRANSFORMERS_OFFLINE); unset it to push"
        )


def push_model_folder(folder: str | os.PathLike, repo_id: str, private: bool = True) -> str:
    """Upload the model folder ``folder`` to the Hub model repo ``repo_id`` (created when missing,
    ``private`` then) so the repo holds exactly its files, and return the commit's URL.

    The folder must pass a loader's checks first (its record, every file's SHA-256): a damaged
    folder is never published. Files of an earlier push that the folder no longer has are deleted
    from the repo, since a stale file under ``llm/`` would fail those checks after a download."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    read_record(folder, "model_folder", verify_files=True)
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=folder,
        commit_message=f"Upload {folder.name} with med3dvlm",
        delete_patterns="*",
    )
    return str(commit.commit_url)
