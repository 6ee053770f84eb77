"""Retrieval evaluation: the SigLIP stage export holds both towers, one loader reads it and the
importer's layout, and ``task=retrieval`` scores the first N test pairs in both directions."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.siglip import INPUT_SIZE, prepared_data, stage, tiny_bert
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from med3dvlm.artifacts.encoder_export import (
    HEADS_FILE,
    SIGLIP_EXPORT,
    TEXT_ENCODER_DIR,
    WEIGHTS_FILE,
    load_encoder_export,
    load_siglip_export,
)
from med3dvlm.artifacts.latest import latest
from med3dvlm.artifacts.record import RECORD_FILE
from med3dvlm.data.datasets import read_caption_split
from med3dvlm.evaluation.tasks import EvalContext, RetrievalTask
from med3dvlm.metrics.retrieval import retrieval_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, object]:
    """A tiny SigLIP stage, its export and a prepared folder whose test split holds all 27 pairs (24 cases, 3 with a second series)."""
    root = tmp_path_factory.mktemp("siglip_eval")
    data = prepared_data(root)
    module = stage(tiny_bert(root, data), experiment="unit").eval()
    with torch.no_grad():  # distinct heads, so a head loaded into the wrong tower would show
        module.image_tower.mm_vision_proj.weight.mul_(3.0)
    module.export(root / "run" / "export", "final")
    # Same volumes and reports, every pair in the test split.
    wide = root / "all_test"
    wide.mkdir()
    (wide / "M3D_Cap").symlink_to(data / "M3D_Cap")
    pairs = [
        {"image": i, "text": t}
        for split in ("train", "validation", "test")
        for i, t in read_caption_split(data, split)
    ]
    (wide / "M3D_Cap.json").write_text(json.dumps({"train": pairs[:1], "validation": [], "test": pairs}))
    return root / "run" / "export", wide, module


def _probe(towers_or_stage) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 1, *INPUT_SIZE, generator=g)
    ids = torch.randint(5, 300, (3, 9), generator=g)
    with torch.no_grad():
        return (towers_or_stage.image_tower(image), towers_or_stage.text_tower(ids, torch.ones_like(ids)))


def test_stage_export_holds_both_towers_and_stays_an_encoder_export(exported):
    folder, _, module = exported
    assert {p.name for p in folder.iterdir()} == {WEIGHTS_FILE, RECORD_FILE, HEADS_FILE, TEXT_ENCODER_DIR}
    assert json.loads((folder / RECORD_FILE).read_text())["text_pooling"] == "first"
    encoder, _ = load_encoder_export(folder)  # what stage 2 reads is unchanged
    for name, value in module.encoder.state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value)
    assert latest(SIGLIP_EXPORT, "unit", folder.parent.parent) == folder
    towers = load_siglip_export(folder)
    for loaded, original in zip(_probe(towers), _probe(module)):
        assert torch.equal(loaded, original)
    assert towers.record.input_size == INPUT_SIZE and towers.log_scale == pytest.approx(
        float(module.loss.log_scale.detach())
    )


def test_one_loader_reads_the_importer_layout(exported, tmp_path):
    folder, _, module = exported
    imported = tmp_path / "imported"
    shutil.copytree(folder / TEXT_ENCODER_DIR, imported / TEXT_ENCODER_DIR)
    shutil.copy(folder / HEADS_FILE, imported / HEADS_FILE)
    (imported / "encoder").mkdir()
    for name in (WEIGHTS_FILE, RECORD_FILE):
        shutil.copy(folder / name, imported / "encoder" / name)
    for loaded, original in zip(_probe(load_siglip_export(imported)), _probe(module)):
        assert torch.equal(loaded, original)


def test_an_encoder_only_export_is_a_clear_error(exported, tmp_path):
    folder, _, _ = exported
    old = tmp_path / "old"
    old.mkdir()
    for name in (WEIGHTS_FILE, RECORD_FILE):
        shutil.copy(folder / name, old / name)
    with pytest.raises(
        FileNotFoundError, match=f"{TEXT_ENCODER_DIR}: not found; retrieval needs both towers"
    ):
        load_siglip_export(old)


def test_a_text_encoder_key_left_out_is_a_clear_error(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _, _ = exported
    copy = shutil.copytree(folder, tmp_path / "export")
    weights = copy / TEXT_ENCODER_DIR / "model.safetensors"
    state = load_file(str(weights))
    dropped = min(state)
    del state[dropped]
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=f"key '{dropped}' missing"):
        load_siglip_export(copy)


def test_retrieval_task_scores_subsets_in_both_directions(exported, tmp_path):
    folder, data, module = exported
    ctx = EvalContext(
        out_dir=str(tmp_path), data_dir=str(data), model=str(folder), batch_size=5, progress=False
    )
    result = RetrievalTask(sizes=(5, 10, 100)).run(ctx)
    metrics = result.metrics
    assert metrics["num_pairs"] == 27 and metrics["subsets"] == [5, 10]
    # The same numbers as the stage's own towers on the same pairs.
    towers = load_siglip_export(folder)
    from med3dvlm.data.datasets import RetrievalDataset, VolumeReader

    dataset = RetrievalDataset(data, "test", towers.tokenizer, VolumeReader(INPUT_SIZE))
    image_emb, text_emb = RetrievalTask.embed(
        module.image_tower, module.text_tower, dataset, towers.tokenizer.pad_token_id, ctx
    )
    assert metrics["metrics"] == pytest.approx(retrieval_metrics(image_emb, text_emb, (5, 10, 100)))
    assert set(metrics["metrics"]) >= {
        f"{d}_R@{k}_n{n}" for d in ("i2t", "t2i") for k in (1, 5, 10) for n in (5, 10)
    }
    assert "| i2t n=5 |" in result.table and "| t2i n=10 |" in result.table and "n=100" not in result.table
    with open(result.files["predictions"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and all(1 <= int(r["i2t rank (n=10)"]) <= 10 for r in rows)
    assert json.loads(result.files["metrics"].read_text())["subsets"] == [5, 10]
    assert result.files["chart"].read_bytes()[:4] == b"\x89PNG"


def test_entry_point_config_builds_the_retrieval_task(exported, tmp_path):
    folder, data, _ = exported
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                "task=retrieval",
                f"model={folder}",
                f"data_dir={data}",
                f"paths.output_dir={tmp_path}",
                "context.progress=false",
            ],
        )
    task = instantiate(cfg.task)
    assert isinstance(task, RetrievalTask) and task.sizes == (100, 500, 1000, 2000)
    result = task.run(instantiate(cfg.context, _convert_="all"))
    assert result.metrics["subsets"] == [27]  # fewer pairs than the smallest subset: all of them
    assert (tmp_path / "metrics_retrieval.md").is_file()


def test_loader_reads_what_the_importer_writes(tmp_path, reference_dir):
    """The released DEC_CLIP layout (tiny) through ``import_siglip``, then ``load_siglip_export``."""
    import torch.nn.functional as F
    from test_import_weights import NANO, siglip_state, write_siglip
    from transformers import DistilBertConfig, DistilBertModel

    from med3dvlm.artifacts.released import import_siglip
    from med3dvlm.models.tiny_qwen import train_tokenizer

    text_model = tmp_path / "distilbert"
    torch.manual_seed(0)
    DistilBertModel(
        DistilBertConfig(
            vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
        )
    ).save_pretrained(text_model)
    train_tokenizer(["a small scan of the chest", "no mass seen"], 300).save_pretrained(text_model)
    refs = {"nano": torch.load(reference_dir / "dcformer_nano.pt", weights_only=True)}
    state = siglip_state(refs, text_model)
    out = import_siglip(write_siglip(tmp_path / "release", state, text_model), tmp_path / "out", NANO)

    towers = load_siglip_export(out)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        hidden = DistilBertModel.from_pretrained(text_model).eval()
        hidden.load_state_dict(
            {
                k[len("language_encoder.") :]: v.float()
                for k, v in state.items()
                if k.startswith("language_encoder.") and "position_ids" not in k
            }
        )
        first = hidden(input_ids=ids).last_hidden_state[:, 0]
        expected = F.normalize(
            first @ state["mm_language_proj.weight"].float().T + state["mm_language_proj.bias"].float(),
            dim=-1,
        )
        assert torch.allclose(towers.text_tower(ids, torch.ones_like(ids)), expected, atol=1e-5)
    assert towers.record.input_size == (64, 128, 128) and towers.log_scale == pytest.approx(2.5)
