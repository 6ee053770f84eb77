"""The texts of a dataset, for training a tokenizer on it (the demo's tiny BERT and Qwen2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from med3dvlm.data.prepared import caption_file, read_manifest
from med3dvlm.data.releases import RELEASES


def corpus_texts(root: str | os.PathLike) -> list[str]:
    """Every report and question text of a prepared folder (or a raw M3D root), deduplicated, in a
    deterministic order: the release's own corpus, else the reports its caption lists name."""
    root = Path(root)
    manifest = read_manifest(root) or {}
    release = RELEASES[str(manifest.get("dataset") or "m3d")]
    if release.corpus is not None:
        return release.corpus(root)
    texts: dict[str, None] = {}
    lists = json.loads(caption_file(root).read_text(encoding="utf-8"))
    for entries in lists.values():
        for entry in entries:
            text = (root / entry["text"]).read_text(encoding="utf-8").strip()
            if text:
                texts[text] = None
    return list(texts)
