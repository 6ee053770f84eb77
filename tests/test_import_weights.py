"""Importing the released checkpoints: tiny checkpoints in the original layout (DCFormer nano and
the small Mixer from the reference vectors, a tiny DistilBERT and Qwen2) go through the importer and
reproduce the reference outputs; bad keys fail naming the key. The merged VLM is streamed: its folder is
byte for byte the one an import holding the whole model in memory writes, and a bad key, shape or dtype
is named from the headers before any tensor is read."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.commands import run_in_process
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel, Qwen2Config, Qwen2ForCausalLM

from med3dvlm.artifacts import model_folder, released
from med3dvlm.artifacts.encoder_export import load_encoder_export
from med3dvlm.artifacts.model_folder import load_pretrained, save_pretrained
from med3dvlm.artifacts.released import import_siglip, import_vlm, qwen2_config, read_checkpoint, to_float32
from med3dvlm.models.dcformer import DCFormer
from med3dvlm.models.projectors import MixerProjector
from med3dvlm.models.reference_layout import ReferenceLayoutError, to_reference_state_dict
from med3dvlm.models.tiny_qwen import train_tokenizer
from med3dvlm.models.towers import TextTower
from med3dvlm.models.vlm import IMAGE_TOKEN, VisionLanguageModel
from med3dvlm.utils.fingerprint import folder_files

REPO_ROOT = Path(__file__).resolve().parents[1]
NANO = {"_target_": "med3dvlm.models.dcformer.DCFormer", "variant": "nano", "stem": "reference"}
MIXER = {
    "_target_": "med3dvlm.models.projectors.MixerProjector",
    "encoder_channels": "???",
    "encoder_tokens": "???",
    "llm_dim": "???",
}
# Nano at (D, H, W) = (64, 128, 128): s3 (2,4,4) = 32 tokens, s4 (1,2,2) = 4, the small Mixer's inputs.
ORIGINAL_INPUT_SIZE = [128, 128, 64]  # the original's (H, W, D)
EMBED = 48


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def refs(reference_dir: Path) -> dict:
    return {
        "nano": torch.load(reference_dir / "dcformer_nano.pt", weights_only=True),
        "mixer": torch.load(reference_dir / "mixer_small.pt", weights_only=True),
    }


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> Path:
    """A tiny DistilBERT config + tokenizer folder (stands in for medicalai/ClinicalBERT)."""
    folder = tmp_path_factory.mktemp("tiny_distilbert")
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
    )
    DistilBertModel(config).save_pretrained(folder)
    train_tokenizer(["a small scan of the chest", "no mass seen"], 300).save_pretrained(folder)
    return folder


def siglip_state(refs: dict, text_model: Path) -> dict:
    """A DEC_CLIP state dict at tiny sizes; the heads in bfloat16 and t_prime in float64 as released."""
    torch.manual_seed(1)
    text = DistilBertModel.from_pretrained(text_model).state_dict()
    state = {
        "t_prime": torch.tensor(2.5, dtype=torch.float64),
        "bias": torch.tensor(-1.25, dtype=torch.bfloat16),
        **_prefixed(refs["nano"]["state_dict"], "vision_encoder."),
        **_prefixed(text, "language_encoder."),
        "language_encoder.embeddings.position_ids": torch.arange(64)[None],
        "mm_vision_proj.weight": torch.randn(EMBED, 256).bfloat16(),
        "mm_vision_proj.bias": torch.randn(EMBED).bfloat16(),
        "mm_language_proj.weight": torch.randn(EMBED, 32).bfloat16(),
        "mm_language_proj.bias": torch.randn(EMBED).bfloat16(),
    }
    return state


def write_siglip(folder: Path, state: dict, text_model: Path) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    config = {
        "model_type": "dec_clip",
        "architectures": ["DEC_CLIP"],
        "wb_name": "DCFormer_SigLIP",
        "language_model_name_or_path": str(text_model),
        "vision_encoder": "dcformer",
        "loss_type": "sigmoid",
        "input_size": ORIGINAL_INPUT_SIZE,
        "dim": 768,
        "depth": 12,
        "hidden_size": EMBED,
        "mlp_depth": 2,
        "gather_loss": True,
        "local_loss": False,
        "efficient_loss": False,
        "pretrained_model": None,
        "siglip_margin": 0.1,
        "t_prime": 2.659260036932778,
        "bias": 0.0,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_siglip_import_reproduces_reference(tmp_path, refs, text_model):
    state = siglip_state(refs, text_model)
    out = import_siglip(write_siglip(tmp_path / "release", state, text_model), tmp_path / "out", NANO)

    encoder, exported = load_encoder_export(out / "encoder")
    assert exported.input_size == (64, 128, 128) and exported.preprocessing.dataset == "m3d"
    with torch.no_grad():
        hidden = encoder.eval()(refs["nano"]["input"])
    for ours, ref in zip(hidden, refs["nano"]["hidden_states"], strict=True):
        assert rel_diff(ours, ref) <= 1e-5

    heads = load_file(str(out / "siglip_heads.safetensors"))
    assert all(v.dtype == torch.float32 for v in heads.values())
    assert heads["loss.log_scale"].item() == pytest.approx(2.5)  # exp reading: log_scale = t_prime
    assert heads["loss.bias"].item() == -1.25
    torch.testing.assert_close(
        heads["image_tower.mm_vision_proj.weight"], state["mm_vision_proj.weight"].float()
    )

    # The text side loads through our TextTower exactly as our config group builds it.
    tower = TextTower(out / "text_encoder", embed_dim=EMBED).eval()
    tower.mm_language_proj.load_state_dict(
        {k.split(".")[-1]: v for k, v in heads.items() if k.startswith("text_tower.")}
    )
    reference_text = DistilBertModel.from_pretrained(text_model).eval()
    reference_text.load_state_dict(
        {
            k[len("language_encoder.") :]: v
            for k, v in state.items()
            if k.startswith("language_encoder.") and "position_ids" not in k
        }
    )
    ids = torch.tensor([[1, 5, 9, 2], [3, 4, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        first = reference_text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        expected = F.normalize(
            F.linear(first, state["mm_language_proj.weight"].float(), state["mm_language_proj.bias"].float()),
            dim=-1,
        )
        assert rel_diff(tower(ids, mask), expected) <= 1e-5
    record = json.loads((out / "import.json").read_text())
    assert record["unused_keys"] == ["language_encoder.embeddings.position_ids"]
    assert exported.components["encoder"]["variant"] == "nano"


def test_siglip_linear_scale(tmp_path, refs, text_model):
    source = write_siglip(tmp_path / "release", siglip_state(refs, text_model), text_model)
    out = import_siglip(source, tmp_path / "out", NANO, siglip_scale="linear")
    assert load_file(str(out / "siglip_heads.safetensors"))["loss.log_scale"].item() == pytest.approx(
        math.log(2.5)
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        # The shared converter names a missing encoder entry by our key and the checkpoint prefix.
        ("missing", "vision_encoder.encoder.s2.0.scale|'stages.2.0.scale' (prefix 'vision_encoder.')"),
        ("missing", "mm_language_proj.bias"),
        ("missing", "language_encoder.transformer.layer.1.ffn.lin2.weight"),
        ("extra", "language_encoder.pooler.dense.weight"),
        ("extra", "logit_scale"),
        ("shape", "vision_encoder.encoder.s1.0.mlp.mlp.0.weight"),
        ("shape", "mm_vision_proj.weight"),
        ("shape", "language_encoder.embeddings.word_embeddings.weight"),
    ],
)
def test_siglip_bad_key_is_named(tmp_path, refs, text_model, change, named):
    state = siglip_state(refs, text_model)
    if change == "missing":
        del state[named.split("|")[0]]
    elif change == "extra":
        state[named] = torch.zeros(3)
    else:
        state[named] = torch.zeros(*state[named].shape[:-1], state[named].shape[-1] + 1)
    source = write_siglip(tmp_path / "release", state, text_model)
    with pytest.raises(ReferenceLayoutError, match=re.escape(named.split("|")[-1])):
        import_siglip(source, tmp_path / "out", NANO)
    assert not (tmp_path / "out" / "encoder").exists()


# --- the merged VLM -----------------------------------------------------------------------------


def qwen_config(vocab: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=False,
    )


def write_vlm(
    folder: Path, refs: dict, drop: str | None = None, change: dict[str, torch.Tensor] | None = None
) -> tuple[Path, dict]:
    """The merged VLM at tiny sizes, sharded safetensors with an index, tokenizer with <im_patch>;
    ``drop`` leaves a key out, ``change`` replaces keys (new ones go to the LLM's shard)."""
    folder.mkdir(parents=True)
    tokenizer = train_tokenizer(["describe the findings of this scan", "no abnormality"], 280)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.save_pretrained(folder)
    torch.manual_seed(2)
    llm = Qwen2ForCausalLM(qwen_config(len(tokenizer)))
    shards = {
        "model-00001-of-00002.safetensors": {
            **_prefixed(refs["nano"]["state_dict"], "model.vision_tower.vision_tower."),
            **_prefixed(refs["mixer"]["state_dict"], "model.mm_projector."),
        },
        "model-00002-of-00002.safetensors": {k: v.bfloat16() for k, v in llm.state_dict().items()},
    }
    for key, value in (change or {}).items():
        shard = next(
            (shard for shard in shards.values() if key in shard), shards["model-00002-of-00002.safetensors"]
        )
        shard[key] = value
    weight_map = {}
    for name, shard in shards.items():
        shard.pop(drop, None)
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    mixer = refs["mixer"]["config"]
    config = {
        **qwen_config(len(tokenizer)).to_dict(),
        "model_type": "vlm_qwen",
        "architectures": ["VLMQwenForCausalLM"],
        "vision_tower": "dcformer",
        "vision_select_layer": -2,
        "vision_select_feature": "cls_patch",
        "input_size": ORIGINAL_INPUT_SIZE,
        "patch_size": [16, 16, 16],
        "dim": 768,
        "depth": 12,
        "mm_projector_type": "mixer",
        "mm_mlp_depth": mixer["mlp_depth"],
        "proj_out_num": 32,
        "low_output_size": mixer["low_output_size"],
        "high_output_size": mixer["high_output_size"],
        "low_input_size": mixer["low_input_size"],
        "high_input_size": mixer["high_input_size"],
        "mm_hidden_size": 768,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, llm.state_dict()


def test_vlm_import_reproduces_reference(tmp_path, refs):
    source, llm_state = write_vlm(tmp_path / "release", refs)
    out = import_vlm(source, tmp_path / "out", NANO, MIXER)
    loaded = load_pretrained(out)
    model = loaded.model
    assert model.reference_placement is True
    assert loaded.record.input_size == (64, 128, 128) and loaded.record.prompt_format == "m3d"
    assert (
        model.image_token_id == model.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == 280
    )  # 280 BPE entries, then <im_patch>
    with torch.no_grad():
        hidden = model.vision_tower(refs["nano"]["input"])
        for ours, ref in zip(hidden, refs["nano"]["hidden_states"], strict=True):
            assert rel_diff(ours, ref) <= 1e-5
        assert (
            rel_diff(model.projector([refs["mixer"]["low"], refs["mixer"]["high"]]), refs["mixer"]["output"])
            <= 1e-5
        )
    for key, value in model.llm.state_dict().items():
        torch.testing.assert_close(value, llm_state[key].bfloat16().float(), rtol=0, atol=0)
    # The whole model runs with the original placement: image block, then text.
    ids = torch.tensor([[model.image_token_id] * 32 + [5, 6, 7]])
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), images=torch.rand(1, 1, 64, 128, 128)).logits
    assert logits.shape == (1, 35, 281) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        (
            "model.mm_projector.high_mixer.1.ln2.bias",
            "'high.1.channel_norm.bias' (prefix 'model.mm_projector.')",
        ),
        (
            "model.vision_tower.vision_tower.encoder.s4.0.scale",
            "'stages.4.0.scale' (prefix 'model.vision_tower",
        ),
        ("model.layers.0.mlp.up_proj.weight", "'model.layers.0.mlp.up_proj.weight'"),
        ("lm_head.weight", "'lm_head.weight'"),
    ],
)
def test_vlm_missing_key_is_named(tmp_path, refs, drop, named):
    source, _ = write_vlm(tmp_path / "release", refs, drop=drop)
    with pytest.raises(ReferenceLayoutError, match=re.escape(named)):
        import_vlm(source, tmp_path / "out", NANO, MIXER)


def in_memory_import(source: Path, streamed: Path, out: Path) -> Path:
    """The import as it was before streaming: the release's LLM held whole in memory as float32 and
    written by its own ``save_pretrained``, beside the streamed import's vision tower, projector, record
    and import.json."""
    state = to_float32(read_checkpoint(source))
    llm = Qwen2ForCausalLM(qwen2_config(json.loads((source / "config.json").read_text())))
    vision_or_projector = ("model.vision_tower.", "model.mm_projector.")
    llm.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith(vision_or_projector)}, strict=True
    )
    imported = load_pretrained(streamed)
    model = VisionLanguageModel(
        imported.model.vision_tower,
        imported.model.projector,
        llm.eval(),
        AutoTokenizer.from_pretrained(source),
        reference_placement=True,
    )
    return save_pretrained(
        model,
        out,
        replace(imported.record, files={}),
        write_files=lambda staging: shutil.copy(streamed / "import.json", staging),
    )


def test_streamed_import_is_the_in_memory_import_byte_for_byte(tmp_path, refs, monkeypatch):
    for module in (model_folder, released):
        monkeypatch.setattr(module, "LLM_SHARD_SIZE", "100KB")  # several llm/ shards and their index
    source, _ = write_vlm(tmp_path / "release", refs)
    streamed = import_vlm(source, tmp_path / "streamed", NANO, MIXER)
    expected = in_memory_import(source, streamed, tmp_path / "in_memory")
    files = folder_files(streamed)
    assert files == folder_files(expected)
    assert "llm/model.safetensors.index.json" in files and sum(f.startswith("llm/model-") for f in files) > 2
    for name in files:  # weights, configs, tokenizer, record.json (every file's SHA-256) and import.json
        assert (streamed / name).read_bytes() == (expected / name).read_bytes(), name


LLM_SHARD = "model-00002-of-00002.safetensors"


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        (
            "model.layers.0.mlp.up_proj.weight",
            torch.zeros(128, 257),
            f"{LLM_SHARD}: key {{}}: shape [128, 257]",
        ),
        (
            "model.norm.weight",
            torch.zeros(256, dtype=torch.int64),
            f"{LLM_SHARD}: key {{}}: dtype torch.int64",
        ),
        ("model.layers.1.mlp.up_proj.weight", torch.zeros(128, 256), f"{LLM_SHARD}: key {{}} does not exist"),
        ("lm_head.weight", None, "model.safetensors.index.json: the checkpoint has no key {}"),
        (
            "model.mm_projector.high_mixer.1.ln2.bias",
            torch.zeros(3),
            "model.safetensors.index.json: key {}: shape [3]",
        ),
        (
            "model.vision_tower.vision_tower.encoder.s4.0.scale",
            torch.zeros(3),
            "index.json: key {}: shape [3]",
        ),
    ],
)
def test_a_bad_release_is_named_before_any_tensor_is_read(tmp_path, refs, monkeypatch, key, value, named):
    if value is None:
        source, _ = write_vlm(tmp_path / "release", refs, drop=key)
    else:
        source, _ = write_vlm(tmp_path / "release", refs, change={key: value})

    def unread(*args):
        raise AssertionError("a tensor was read before every key, shape and dtype was checked")

    monkeypatch.setattr(released, "read_tensor", unread)
    monkeypatch.setattr(released, "read_pieces", unread)
    with pytest.raises(ReferenceLayoutError, match=re.escape(named.format(repr(key)))):
        import_vlm(source, tmp_path / "out", NANO, MIXER)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_a_failure_while_copying_leaves_no_folder(tmp_path, refs, monkeypatch):
    source, _ = write_vlm(tmp_path / "release", refs)

    def failing(path, entry):
        raise OSError(f"{path}: input/output error")

    monkeypatch.setattr(released, "read_pieces", failing)
    with pytest.raises(OSError, match="input/output error"):
        import_vlm(source, tmp_path / "out", NANO, MIXER)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_original_layout_round_trip(refs):
    """Our modules' state dicts under the original's names are the reference checkpoints' keys."""
    nano = DCFormer(variant="nano", stem="reference")
    assert to_reference_state_dict(nano).keys() == refs["nano"]["state_dict"].keys()
    config = refs["mixer"]["config"]
    mixer = MixerProjector(
        encoder_channels=[config["low_input_size"][1], config["high_input_size"][1]],
        encoder_tokens=[config["low_input_size"][0], config["high_input_size"][0]],
        llm_dim=config["output_dim"],
        low_tokens=config["low_output_size"],
        high_tokens=config["high_output_size"],
    )
    original = to_reference_state_dict(mixer, "model.mm_projector.")
    assert original.keys() == {f"model.mm_projector.{k}" for k in refs["mixer"]["state_dict"]}


def test_read_checkpoint_bin_and_unlisted_shard_key(tmp_path):
    state = {"a.weight": torch.ones(2, 3), "b": torch.tensor(3)}
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert read_checkpoint(tmp_path).keys() == state.keys()
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "s1.safetensors"}})
    )
    with pytest.raises(ReferenceLayoutError, match="'a.weight'"):
        read_checkpoint(tmp_path)


def test_cli_siglip(tmp_path, refs, text_model, monkeypatch):
    source = write_siglip(tmp_path / "release", siglip_state(refs, text_model), text_model)
    run_in_process(
        monkeypatch,
        "import_weights",
        f"source={source}",
        "kind=siglip",
        f"out={tmp_path / 'out'}",
        "encoder=dcformer_nano",
        f"text_model={text_model}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert (tmp_path / "out" / "encoder" / "record.json").is_file()
