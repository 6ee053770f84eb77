"""Importing the FLARE 2025 release: a tiny release in the original's layout (the merged model as
``test_import_weights`` builds it, plus ``pretrained/`` with the stage-2 files its finetune started
from) goes through the importer; the model folder and the projector hand-off both reproduce the
reference vectors, and bad files fail naming the file and the key without unpickling anything."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers.commands import run_in_process
from safetensors.torch import save_file
from test_import_weights import MIXER, NANO, qwen_config, rel_diff, write_vlm
from transformers import AutoTokenizer, Qwen2ForCausalLM

from med3dvlm.artifacts.handoff import load_pretrain_handoff
from med3dvlm.artifacts.model_folder import load_pretrained
from med3dvlm.artifacts.record import read_record
from med3dvlm.artifacts.released import EMBEDDING_KEY, import_flare
from med3dvlm.models.llm import LanguageModel
from med3dvlm.models.reference_layout import ReferenceLayoutError
from med3dvlm.models.tiny_qwen import train_tokenizer
from med3dvlm.models.vlm import IMAGE_TOKEN, VisionLanguageModel

VISION_FILE = "pretrained/vision_encoder.safetensors"
PROJECTOR_FILE = "pretrained/mm_projector.safetensors"
FLARE_INPUT_SIZE = [64, 128, 128]  # FLARE's config stores the (D, H, W) its data is resized to
HIDDEN = 256  # the tiny Qwen2's width, the small Mixer's output


@pytest.fixture(scope="module")
def refs(reference_dir: Path) -> dict:
    """The reference vectors the tiny release's weights come from (DCFormer nano, the small Mixer)."""
    return {
        name: torch.load(reference_dir / f"{file}.pt", weights_only=True)
        for name, file in (("nano", "dcformer_nano"), ("mixer", "mixer_small"))
    }


@pytest.fixture(scope="module")
def base_llm(tmp_path_factory) -> Path:
    """The tiny base LLM: write_vlm's tokenizer without <im_patch>, and a Qwen2 of that vocabulary."""
    folder = tmp_path_factory.mktemp("base_llm")
    tokenizer = train_tokenizer(["describe the findings of this scan", "no abnormality"], 280)
    tokenizer.save_pretrained(folder)
    Qwen2ForCausalLM(qwen_config(len(tokenizer))).save_pretrained(folder)
    return folder


def pretrained_state(refs: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The two stage-2 files in the original's key layout (bare DCFormer keys; the Mixer under
    ``model.mm_projector.`` with the whole embedding, bfloat16 as trained): 280 base rows + <im_patch>."""
    torch.manual_seed(3)
    return {
        VISION_FILE: dict(refs["nano"]["state_dict"]),
        PROJECTOR_FILE: {
            **{f"model.mm_projector.{k}": v for k, v in refs["mixer"]["state_dict"].items()},
            EMBEDDING_KEY: torch.randn(281, HIDDEN).bfloat16(),
        },
    }


def write_flare(folder: Path, refs: dict, pretrained: dict[str, dict[str, torch.Tensor]]) -> Path:
    write_vlm(folder, refs)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "input_size": FLARE_INPUT_SIZE}))
    (folder / "pretrained").mkdir()
    for name, state in pretrained.items():
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    return folder


def assert_reproduces(model: VisionLanguageModel, refs: dict) -> None:
    with torch.no_grad():
        hidden = model.vision_tower(refs["nano"]["input"])
        for ours, ref in zip(hidden, refs["nano"]["hidden_states"], strict=True):
            assert rel_diff(ours, ref) <= 1e-5
        projected = model.projector([refs["mixer"]["low"], refs["mixer"]["high"]])
        assert rel_diff(projected, refs["mixer"]["output"]) <= 1e-5


def test_flare_import_reproduces_reference(tmp_path, refs, base_llm):
    pretrained = pretrained_state(refs)
    source = write_flare(tmp_path / "release", refs, pretrained)
    release_vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    assert AutoTokenizer.from_pretrained(base_llm).get_vocab() == {
        k: v for k, v in release_vocab.items() if k != IMAGE_TOKEN
    }
    out = import_flare(source, tmp_path / "out", NANO, MIXER, llm=str(base_llm))

    loaded = load_pretrained(out / "model")
    record = loaded.record
    assert (record.prompt_format, record.experiment, record.input_size) == (
        "flare",
        "imported-flare",
        (64, 128, 128),
    )
    assert record.preprocessing.dataset == "flare"
    assert set(record.preprocessing.sources) == {"abdomen", "chest"}
    assert record.reference_placement and loaded.model.reference_placement
    assert_reproduces(loaded.model, refs)

    model, handoff = load_pretrain_handoff(out / "pretrained", llm=LanguageModel(str(base_llm)))
    assert handoff.kind == "projector_handoff" and handoff.llm == str(base_llm)
    assert handoff.prompt_format == "flare" and set(handoff.preprocessing.sources) == {"abdomen", "chest"}
    assert (handoff.image_token, handoff.num_image_tokens, handoff.input_size) == (
        IMAGE_TOKEN,
        32,
        (64, 128, 128),
    )
    assert handoff.reference_placement and handoff.components["projector"]["llm_dim"] == HIDDEN
    assert_reproduces(model.eval(), refs)
    # <im_patch> is appended to the base vocabulary, and its row is the embedding's last one.
    assert model.image_token_id == 280
    torch.testing.assert_close(
        model.image_token_embedding.detach(), pretrained[PROJECTOR_FILE][EMBEDDING_KEY][-1].float()
    )

    facts = json.loads((out / "import.json").read_text())
    assert facts["pretrained"]["keys"] == {"vision_encoder.safetensors": 192, "mm_projector.safetensors": 49}
    assert facts["pretrained"]["unused_keys"] == [] and facts["pretrained"]["image_token_row"] == 280
    assert facts["model"]["keys"]["vision"] == 192 and facts["model"]["image_token_id"] == 280


def _broken(state: dict[str, torch.Tensor], change: str, key: str) -> None:
    if change == "missing":
        del state[key]
    elif change == "extra":
        state[key] = torch.zeros(3)
    else:  # one more row (for the embedding: a tokenizer other than the base's)
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])


@pytest.mark.parametrize(
    ("file", "change", "key", "named"),
    [
        (VISION_FILE, "missing", "encoder.s4.0.scale", "'stages.4.0.scale'"),
        (PROJECTOR_FILE, "missing", "model.mm_projector.high_mixer.1.ln2.bias", "'high.1.channel_norm.bias'"),
        (PROJECTOR_FILE, "missing", EMBEDDING_KEY, EMBEDDING_KEY),
        (VISION_FILE, "extra", "vision_encoder.encoder.s0.0.0.c1.0.weight", "vision_encoder.encoder.s0"),
        (VISION_FILE, "extra", "encoder.s5.0.scale", "encoder.s5.0.scale"),
        (PROJECTOR_FILE, "extra", "lm_head.weight", "lm_head.weight"),
        (PROJECTOR_FILE, "extra", "model.mm_projector.low_mixer.2.ln1.weight", "low_mixer.2.ln1.weight"),
        (VISION_FILE, "shape", "encoder.s1.0.mlp.mlp.0.weight", "encoder.s1.0.mlp.mlp.0.weight"),
        (
            PROJECTOR_FILE,
            "shape",
            "model.mm_projector.low_mixer.0.mlp1.mm_projector.0.weight",
            "low_mixer.0.mlp1.mm_projector.0.weight",
        ),
        (PROJECTOR_FILE, "shape", EMBEDDING_KEY, f"{EMBEDDING_KEY}' has 282 rows"),
    ],
)
def test_flare_bad_key_names_file_and_key(tmp_path, refs, base_llm, file, change, key, named):
    pretrained = pretrained_state(refs)
    _broken(pretrained[file], change, key)
    source = write_flare(tmp_path / "release", refs, pretrained)
    with pytest.raises(ReferenceLayoutError, match=f"{re.escape(str(source / file))}: .*{re.escape(named)}"):
        import_flare(source, tmp_path / "out", NANO, MIXER, llm=str(base_llm))
    assert not (tmp_path / "out").exists()


class _Trap:
    """Unpickling this creates ``path``: the proof that a file was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


@pytest.mark.parametrize("file", [VISION_FILE, PROJECTOR_FILE])
def test_flare_pickle_is_refused_unread(tmp_path, refs, base_llm, file):
    """The original saved these files with torch.save under a .safetensors name: refused, never unpickled."""
    pretrained = pretrained_state(refs)
    source = write_flare(tmp_path / "release", refs, pretrained)
    trap = tmp_path / "unpickled"
    torch.save({**pretrained[file], "trap": _Trap(trap)}, source / file)
    with pytest.raises(ValueError, match=f"{re.escape(str(source / file))}: not a safetensors file"):
        import_flare(source, tmp_path / "out", NANO, MIXER, llm=str(base_llm))
    assert not trap.exists() and not (tmp_path / "out").exists()
    with (source / file).open("rb") as pickled:  # a file object: torch.load goes by a path's suffix
        torch.load(pickled, weights_only=False)
    assert trap.is_dir()  # the trap does spring when the file is unpickled


def test_cli_flare(tmp_path, refs, base_llm, monkeypatch, capfd):
    source = write_flare(tmp_path / "release", refs, pretrained_state(refs))
    out = tmp_path / "out"
    run_in_process(
        monkeypatch,
        "import_weights",
        "kind=flare",
        f"source={source}",
        f"out={out}",
        "encoder=dcformer_nano",
        f"llm.name_or_path={base_llm}",
        "reference_placement=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    printed = capfd.readouterr().out
    assert f"stage.module.pretrain_export={out / 'pretrained'}" in printed
    assert f"python -m med3dvlm.evaluate task=report model={out / 'model'}" in printed
    # The placement setting is the hand-off's; the model folder keeps the one its weights were trained with.
    handoff = read_record(out / "pretrained", "projector_handoff")
    assert handoff.llm == str(base_llm) and not handoff.reference_placement
    assert read_record(out / "model", "model_folder").reference_placement
