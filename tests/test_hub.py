"""Sharing a model as the field does: ``export`` writes a model card (record, scores, data licence)
into the model folder, ``push_to_hub=ORG/NAME`` uploads exactly that folder with huggingface_hub, and
``load_pretrained("ORG/NAME")`` loads it from the local Hugging Face cache with every check a folder
gets. Nothing here touches the network: the upload is intercepted, the cache is built on disk."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers.vlm import ENCODER_CONFIG, INPUT_SIZE, PROJECTOR_CONFIG, encoder, tiny_llm
from huggingface_hub import HfApi, constants, scan_cache_dir
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from med3dvlm import export
from med3dvlm.artifacts.hub import push_model_folder
from med3dvlm.artifacts.model_card import CARD_FILE, write_model_card
from med3dvlm.artifacts.model_folder import load_pretrained, save_pretrained
from med3dvlm.artifacts.record import ArtifactRecord, Parent, read_record
from med3dvlm.configs import CONFIG_DIR
from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.data.preprocess import Preprocessing, SourcePreprocessing
from med3dvlm.evaluation.outputs import write_metrics_json
from med3dvlm.models.build import build_projector
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.utils.fingerprint import file_sha256

REPO_ID = "med3dvlm-lab/tiny-ct-vqa"
CT_RATE = Preprocessing(
    "ctrate",
    {"chest": SourcePreprocessing(window="lung", scale="window", orientation="RAS")},
    {"format": "npy"},
)


def _record(kind: str, stage: str | None, preprocessing: Preprocessing, parents=()) -> ArtifactRecord:
    return ArtifactRecord(
        kind,
        "unit",
        INPUT_SIZE,
        preprocessing,
        {"encoder": ENCODER_CONFIG},
        stage=stage,
        parents=tuple(parents),
    )


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder fine-tuned on CT-RATE from an encoder trained on M3D (its record says so)."""
    root = tmp_path_factory.mktemp("hub")
    llm = tiny_llm(root)
    vision = encoder()
    language_model = llm.load_model()
    projector, projector_config = build_projector(
        PROJECTOR_CONFIG, vision, INPUT_SIZE, language_model.get_input_embeddings().weight.shape[1]
    )
    model = VisionLanguageModel(vision, projector, language_model, llm.load_tokenizer())
    siglip = _record("encoder_export", "siglip", m3d_preprocessing())
    adapter = _record(
        "adapter_handoff", "finetune", CT_RATE, [Parent("encoder", "runs/siglip", "0" * 64, siglip)]
    )
    record = ArtifactRecord(
        "model_folder",
        "unit",
        INPUT_SIZE,
        CT_RATE,
        {"vision_tower": ENCODER_CONFIG, "projector": projector_config},
        prompt_format="m3d",
        llm=llm.name_or_path,
        parents=(Parent("adapter", "runs/finetune/export", "1" * 64, adapter),),
    )
    return save_pretrained(model, root / "outputs" / "export" / "model", record)


def _copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of the model folder under ``tmp_path/outputs`` (its own outputs folder)."""
    copy = tmp_path / "outputs" / "export" / "model"
    shutil.copytree(folder, copy)
    return copy


def run_export(*overrides: str) -> None:
    """``python -m med3dvlm.export OVERRIDES``, in this process (so the upload can be intercepted)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("export", overrides=list(overrides))
    export.main.__wrapped__(cfg)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_export_writes_a_card_with_the_record_and_the_licence_of_the_data(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    run_export(f"source={folder}", f"paths.log_dir={tmp_path / 'outputs'}")
    card = (folder / CARD_FILE).read_text()
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["library_name"] == "med3dvlm"  # CC BY-NC-SA + Apache-2.0
    assert set(meta["datasets"]) == {"ibrahimhamamci/CT-RATE", "GoodBaiBai88/M3D-Cap", "GoodBaiBai88/M3D-VQA"}
    assert "med3dvlm" in meta["tags"] and "base_model" not in meta  # the LLM is a local folder
    for line in (
        "| this model | model folder |  | unit | ctrate |",
        "| adapter | adapter handoff | finetune | unit | ctrate |",
        "| encoder | encoder export | siglip | unit | m3d |",
        "| chest | [-1350.0, 150.0] | window | RAS | as stored | above 0.0 | trilinear |",
        "| ctrate | `cc-by-nc-sa-4.0` |",
        "| m3d | `apache-2.0` |",
    ):
        assert line in card, line
    assert "`m3d` (`med3dvlm.data.prompts`)" in card and "(1, 32, 64, 64)" in card
    assert "Not evaluated" in card
    # The card is no part of the record: the folder still loads with every file checked.
    assert CARD_FILE not in read_record(folder, verify_files=True).files


def _evaluation(root: Path, run: str, model: str, task: str = "vqa_closed", **fields) -> Path:
    out = root / "evaluate" / run
    metrics = {"task": task, "model": model, "split": "test", "num_samples": 7, **fields}
    metrics.setdefault("generation", {"do_sample": False, "max_new_tokens": 8})
    write_metrics_json(out / f"metrics_{task}.json", metrics)
    (out / f"metrics_{task}.md").write_text(
        f"## Closed VQA ({run})\n\n| type | accuracy |\n|---|---:|\n| all | 50.00 |\n"
    )
    return out / f"metrics_{task}.json"


def test_the_card_shows_the_newest_evaluation_of_this_very_folder(model_folder, tmp_path, monkeypatch):
    folder = _copy(model_folder, tmp_path)
    outputs = tmp_path / "outputs"
    monkeypatch.chdir(tmp_path)  # evaluate's model= relative to where it ran
    _evaluation(outputs, "d/older", str(folder))
    _evaluation(outputs, "d/newer", "outputs/export/model")
    _evaluation(outputs, "d/control", str(folder), zero_images=True)
    _evaluation(outputs, "d/other", str(tmp_path / "another_model"))
    stale = _evaluation(outputs, "d/before", str(folder), task="report")  # an earlier model at this place
    created = read_record(folder).created
    os.utime(stale, (created - 60, created - 60))
    for run, offset in (("older", 1), ("newer", 2)):
        os.utime(outputs / f"evaluate/d/{run}/metrics_vqa_closed.json", (created + offset, created + offset))
    card = (write_model_card(folder, outputs)).read_text()
    assert "### Closed VQA (d/newer)" in card and "Run `evaluate/d/newer`" in card
    assert "split test, 7 samples, greedy decoding (max_new_tokens 8)" in card
    for absent in ("d/older", "d/control", "d/other", "d/before", "Not evaluated"):
        assert absent not in card, absent


def test_push_to_hub_uploads_exactly_the_folder_checked_with_its_card(model_folder, tmp_path, monkeypatch):
    folder = _copy(model_folder, tmp_path)
    calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        uploaded = Path(kwargs["folder_path"])
        calls.append(("upload_folder", {**kwargs, "card": (uploaded / CARD_FILE).read_text()}))
        read_record(
            uploaded, "model_folder", verify_files=True
        )  # what is uploaded passes the loader's checks
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "0")
    run_export(f"source={folder}", f"push_to_hub={REPO_ID}", f"paths.log_dir={tmp_path / 'outputs'}")
    (_, created), (_, uploaded) = calls
    assert created == {"repo_id": REPO_ID, "repo_type": "model", "private": True, "exist_ok": True}
    assert uploaded["folder_path"] == folder and uploaded["repo_id"] == REPO_ID
    assert uploaded["delete_patterns"] == "*"  # the repo holds the folder's files and no others
    assert f'load_pretrained("{REPO_ID}")' in uploaded["card"] and "# tiny-ct-vqa" in uploaded["card"]

    # A damaged folder is never published; an offline machine is refused before any work.
    calls.clear()
    (folder / "projector.safetensors").write_bytes(b"0")
    with pytest.raises(ValueError, match="projector.safetensors: sha256"):
        push_model_folder(folder, REPO_ID)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=f"push_to_hub={REPO_ID}: the Hugging Face Hub is switched off"):
        run_export(f"source={tmp_path / 'nothing'}", f"push_to_hub={REPO_ID}")
    assert calls == []


def hub_cache(folder: Path, cache: Path, repo_id: str) -> Path:
    """``folder`` as huggingface_hub lays out a model repo it downloaded: ``blobs/`` by content,
    ``refs/main`` naming the commit, ``snapshots/<commit>/`` of relative links to the blobs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / file_sha256(file)
        blob.parent.mkdir(exist_ok=True)
        shutil.copyfile(file, blob)
        link = repo / "snapshots" / commit / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


def test_load_pretrained_takes_a_hub_id_from_the_cache_with_the_same_checks(
    model_folder, tmp_path, monkeypatch
):
    folder = _copy(model_folder, tmp_path)
    write_model_card(folder, tmp_path / "outputs", REPO_ID)
    cache = tmp_path / "hf_cache"
    snapshot = hub_cache(folder, cache, REPO_ID)
    assert [repo.repo_id for repo in scan_cache_dir(cache).repos] == [REPO_ID]
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    local, hub = load_pretrained(folder), load_pretrained(REPO_ID)
    assert hub.record == local.record
    image = torch.rand(1, 1, *INPUT_SIZE)
    with torch.no_grad():
        assert torch.equal(
            hub.model.project(hub.model.encode_images(image)),
            local.model.project(local.model.encode_images(image)),
        )

    from med3dvlm.resolvers import _model_experiment
    from med3dvlm.web.session import Models

    assert Models(REPO_ID).folders == {REPO_ID.split("/")[1]: snapshot}  # the web page, by Hub id
    assert _model_experiment(REPO_ID) == local.record.experiment  # evaluate's W&B group

    blob = (snapshot / "vision_tower.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-8] + bytes(8))
    with pytest.raises(ValueError, match=r"vision_tower.safetensors: sha256 .* differs"):
        load_pretrained(REPO_ID)
    with pytest.raises(
        FileNotFoundError,
        match=r"med3dvlm-lab/absent: neither a folder here nor a model in the Hugging Face cache",
    ):
        load_pretrained("med3dvlm-lab/absent")
