"""Files from elsewhere are data: a planted payload in an export, a hand-off, a model folder or a
checkpoint folder never runs, and a damaged model folder does not load."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers.vlm import ENCODER_CONFIG, INPUT_SIZE, PROJECTOR_CONFIG, encoder, encoder_export, tiny_llm
from safetensors.torch import load_file, save_file

from med3dvlm.artifacts.encoder_export import load_encoder_export
from med3dvlm.artifacts.model_folder import load_pretrained, save_pretrained
from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.models.build import build_projector
from med3dvlm.models.components import UntrustedComponentError, build_component
from med3dvlm.models.vlm import VisionLanguageModel


class _Payload:
    """Pickled, it creates ``path`` when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder as `python -m med3dvlm.export` writes it (tiny LLM, nano encoder)."""
    root = tmp_path_factory.mktemp("untrusted")
    llm = tiny_llm(root)
    vision = encoder()
    language_model = llm.load_model()
    projector, projector_config = build_projector(
        PROJECTOR_CONFIG, vision, INPUT_SIZE, language_model.get_input_embeddings().weight.shape[1]
    )
    model = VisionLanguageModel(vision, projector, language_model, llm.load_tokenizer())
    record = ArtifactRecord(
        "model_folder",
        "unit",
        INPUT_SIZE,
        m3d_preprocessing(),
        {"vision_tower": ENCODER_CONFIG, "projector": projector_config},
        prompt_format="m3d",
    )
    return save_pretrained(model, root / "model", record)


def _copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def _edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def test_an_export_naming_a_foreign_target_is_refused_and_nothing_runs(tmp_path):
    folder = encoder_export(tmp_path)
    planted = tmp_path / "pwned.txt"
    _edit_json(
        folder / "record.json",
        lambda meta: meta["components"].update(
            encoder={
                "_target_": "pathlib.Path.write_text",
                "self": {"_target_": "pathlib.Path", "_args_": [str(planted)]},
                "data": "ran",
            }
        ),
    )
    with pytest.raises(
        UntrustedComponentError, match=r"record.json: encoder._target_ 'pathlib.Path.write_text'"
    ):
        load_encoder_export(folder)
    assert not planted.exists()


def test_a_model_folder_whose_vision_tower_is_torch_load_is_refused(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    planted = tmp_path / "pwned"
    torch.save(_Payload(planted), tmp_path / "payload.pt")
    _edit_json(
        folder / "record.json",
        lambda cfg: cfg["components"].update(
            vision_tower={"_target_": "torch.load", "f": str(tmp_path / "payload.pt"), "weights_only": False}
        ),
    )
    with pytest.raises(UntrustedComponentError, match=r"record.json: vision_tower._target_ 'torch.load'"):
        load_pretrained(folder)
    assert not planted.exists()


@pytest.mark.parametrize(
    "node",
    [
        {**ENCODER_CONFIG, "variant": {"_target_": "os.system", "command": "true"}},
        {**ENCODER_CONFIG, "_partial_": True},
        {**ENCODER_CONFIG, "_args_": ["nano"]},
    ],
)
def test_nested_targets_and_hydra_keys_inside_an_allowed_component_are_refused(node):
    with pytest.raises(UntrustedComponentError, match="export.json: encoder"):
        build_component(node, "export.json", "encoder")


def test_a_pretrain_handoff_naming_a_foreign_projector_is_refused(tmp_path):
    from med3dvlm.artifacts.handoff import load_pretrain_handoff

    planted = tmp_path / "pwned.txt"
    record = ArtifactRecord(
        "projector_handoff",
        "unit",
        INPUT_SIZE,
        m3d_preprocessing(),
        {
            "vision_tower": ENCODER_CONFIG,
            "projector": {
                "_target_": "pathlib.Path.write_text",
                "self": {"_target_": "pathlib.Path", "_args_": [str(planted)]},
                "data": "x",
            },
        },
        llm=tiny_llm(tmp_path).name_or_path,
    )
    (tmp_path / "record.json").write_text(json.dumps(record.to_dict()))
    with pytest.raises(UntrustedComponentError, match=r"record.json: projector._target_"):
        load_pretrain_handoff(tmp_path)
    # the hand-off format of an older version is refused the same way
    (tmp_path / "record.json").unlink()
    (tmp_path / "handoff.json").write_text(
        json.dumps(
            {
                "kind": "projector",
                "input_size": list(INPUT_SIZE),
                "vision_tower": ENCODER_CONFIG,
                "projector": record.components["projector"],
                "image_token": "<im_patch>",
                "num_image_tokens": 8,
                "reference_placement": False,
                "llm": record.llm,
            }
        )
    )
    with pytest.raises(UntrustedComponentError, match=r"handoff.json: projector._target_"):
        load_pretrain_handoff(tmp_path)
    assert not planted.exists()


def test_a_planted_sharded_checkpoint_does_not_run_on_resume_or_consolidate(tmp_path):
    from med3dvlm.training.checkpointing import CorruptCheckpoint, check_checkpoint, latest_valid_checkpoint
    from med3dvlm.training.sharding import consolidate

    planted = tmp_path / "pwned"
    folder = tmp_path / "checkpoints" / "step999999.ckpt"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload(planted)))
    torch.save({"global_step": 999999, "epoch": 0}, folder / "meta.pt")
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    with pytest.raises(CorruptCheckpoint, match=r"step999999.ckpt.*\.metadata.*refused"):
        check_checkpoint(folder)
    assert latest_valid_checkpoint(folder.parent) is None
    with pytest.raises(CorruptCheckpoint, match="refused"):
        consolidate(folder, tmp_path / "out.ckpt")
    assert not planted.exists()


def test_a_byte_item_of_a_sharded_checkpoint_is_read_without_pickle(tmp_path):
    """Non-tensor values (optimizer hyper-parameters) are torch.save'd inside the shards: they are read
    with ``weights_only=True``, so a planted object is refused."""
    import torch.distributed.checkpoint as dcp

    from med3dvlm.training.checkpointing import CorruptCheckpoint
    from med3dvlm.training.sharding import consolidate

    planted = tmp_path / "pwned"
    folder = tmp_path / "last.ckpt"
    dcp.save(
        {"state_dict": {"w": torch.zeros(4)}, "extra": {"note": _Payload(planted)}}, checkpoint_id=str(folder)
    )
    torch.save({"global_step": 3, "epoch": 0}, folder / "meta.pt")
    with pytest.raises(CorruptCheckpoint, match="refused"):
        consolidate(folder, tmp_path / "out.ckpt")
    assert not planted.exists()


def test_a_model_folder_without_its_tokenizer_does_not_load(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    (folder / "llm" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"llm/tokenizer.json"):
        load_pretrained(folder, verify_files=False)


def test_a_model_folder_missing_an_llm_weight_does_not_load(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    weights = folder / "llm" / "model.safetensors"
    state = load_file(str(weights))
    dropped = next(k for k in state if "layers.1.mlp" in k)
    del state[dropped]
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"model.safetensors: .*missing {dropped!r}"):
        load_pretrained(folder, verify_files=False)


def test_a_model_folder_with_an_extra_llm_weight_does_not_load(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    weights = folder / "llm" / "model.safetensors"
    state = load_file(str(weights))
    state["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected 'model.layers.9.mlp.up_proj.weight'"):
        load_pretrained(folder, verify_files=False)


def test_a_tokenizer_that_does_not_fit_the_llm_does_not_load(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    base = Path(tiny_llm(model_folder.parent).name_or_path)  # the LLM's own tokenizer: no <im_patch>
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, folder / "llm" / name)
    with pytest.raises(ValueError, match=r"tokenizer.json: <im_patch> is not in the tokenizer"):
        load_pretrained(folder, verify_files=False)


def test_a_changed_file_fails_the_fingerprint_and_the_switch_skips_it(model_folder, tmp_path):
    folder = _copy(model_folder, tmp_path)
    config = json.loads((folder / "record.json").read_text())
    assert set(config["files"]) >= {
        "vision_tower.safetensors",
        "projector.safetensors",
        "llm/model.safetensors",
        "llm/tokenizer.json",
    }
    projector = folder / "projector.safetensors"
    state = load_file(str(projector))
    first = next(iter(state))
    state[first] = state[first] + 1.0
    save_file(state, str(projector))
    with pytest.raises(ValueError, match=r"projector.safetensors: sha256 .* differs from the one recorded"):
        load_pretrained(folder)
    load_pretrained(folder, verify_files=False)  # same keys and shapes: only the fingerprint tells
    shutil.copy(model_folder / "projector.safetensors", projector)
    os.remove(folder / "vision_tower.safetensors")
    with pytest.raises(
        FileNotFoundError, match="vision_tower.safetensors: listed in .*record.json but missing"
    ):
        load_pretrained(folder)
