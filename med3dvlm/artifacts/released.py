"""Import the released Med3DVLM checkpoints (``tests/data/reference/checkpoint_layouts.md`` (i), (iv)).

``import_siglip`` reads ``MagicXin/DCFormer_SigLIP`` (the stage-1 ``DEC_CLIP`` model) and writes

    <out>/encoder/           the encoder export stage 2 consumes
                             (``stage.module.encoder_export=<out>/encoder``)
    <out>/text_encoder/      the text encoder + tokenizer as a Hugging Face folder
                             (``text_encoder.model_name_or_path=<out>/text_encoder``)
    <out>/siglip_heads.safetensors   the rest, under the SigLIP stage's attribute names:
                             ``image_tower.mm_vision_proj.{weight,bias}``,
                             ``text_tower.mm_language_proj.{weight,bias}``, ``loss.{log_scale,bias}``
    <out>/import.json        source, key counts and the choices below

``import_vlm`` reads ``MagicXin/Med3DVLM-Qwen-2.5-7B`` (the merged ``VLMQwenForCausalLM``) and writes a
model folder (:mod:`med3dvlm.artifacts.model_folder`, so ``evaluate`` and ``infer`` take it), with
the original's image-token placement on (``reference_placement``, stored in its record). The merged
release is streamed: its safetensors headers are checked first (every key, shape and dtype), then its
LLM is copied tensor by tensor, a bounded piece at a time, into the folder's sharded ``llm/``, so a 7B
import needs about 1 GiB of memory (``python -m med3dvlm.bench --only import``); the files are those an
import that held the whole model in memory would write, byte for byte.

``import_flare`` reads ``MagicXin/Med3DVLM-Qwen-2.5-7B-FLARE2025`` (the same merged layout, plus the
stage-2 weights its finetune started from in ``pretrained/``) and writes

    <out>/model/        the merged model as a model folder (FLARE's prompts and preprocessing)
    <out>/pretrained/   a projector hand-off, what ``stage.module.pretrain_export`` takes
    <out>/import.json   source, key counts and unused keys of both

Strictness: every checkpoint key goes to exactly one module (by prefix) or is in ``UNUSED_KEYS``;
every module key must be filled with the same shape. The first key that does not fit raises
``ReferenceLayoutError`` naming it. Floating tensors are cast to float32 (the release may be
bfloat16; BatchNorm statistics included); integer buffers (``num_batches_tracked``) keep their type.

The SigLIP scale: the original's multi-GPU sigmoid path (``gather_loss``, how the release was
trained) uses ``exp(t_prime)`` as the logit scale, its single-process path ``t_prime`` itself.
``siglip_scale="exp"`` (default) keeps the multi-GPU meaning: ``log_scale = t_prime``;
``"linear"`` takes the single-process one: ``log_scale = log(t_prime)`` (needs ``t_prime > 0``).
Our ``SigLIPLoss`` always computes ``exp(log_scale)``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from hydra.utils import instantiate
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

from med3dvlm.artifacts.encoder_export import (
    HEADS_FILE,
    TEXT_ENCODER_DIR,
    write_encoder_export,
)
from med3dvlm.artifacts.handoff import IMAGE_TOKEN_FILE, PROJECTOR_FILE, VISION_TOWER_FILE, write_handoff
from med3dvlm.artifacts.latest import IMPORTED_ENCODER_DIR
from med3dvlm.artifacts.llm_stream import saved_tensors, write_llm_streamed
from med3dvlm.artifacts.model_folder import LLM_SHARD_SIZE, write_model_folder
from med3dvlm.artifacts.record import ArtifactRecord
from med3dvlm.artifacts.tensors import save_tensors
from med3dvlm.data.prepared import m3d_preprocessing
from med3dvlm.data.releases.flare.recipe import flare_preprocessing
from med3dvlm.models.build import build_projector
from med3dvlm.models.reference_layout import (
    ReferenceLayoutError,
    convert_state_dict,
    load_reference_state_dict,
    rules_for,
)
from med3dvlm.models.vlm import IMAGE_TOKEN
from med3dvlm.utils.atomic import atomic_folder, atomic_write_text
from med3dvlm.utils.safetensors_stream import TensorEntry, read_header, read_pieces, read_tensor

SIGLIP_VISION_PREFIX = "vision_encoder."
SIGLIP_TEXT_PREFIX = "language_encoder."
SIGLIP_HEADS = (
    "mm_vision_proj.weight",
    "mm_vision_proj.bias",
    "mm_language_proj.weight",
    "mm_language_proj.bias",
)
SIGLIP_SCALARS = ("t_prime", "bias")
IMPORT_FILE = "import.json"
VLM_VISION_PREFIX = "model.vision_tower.vision_tower."
VLM_PROJECTOR_PREFIX = "model.mm_projector."
EMBEDDING_KEY = "model.embed_tokens.weight"
FLARE_BASE_LLM = "Qwen/Qwen2.5-7B-Instruct"
FLARE_EXPERIMENT = "imported-flare"
FLARE_INPUT_SIZE = (128, 256, 256)
"""(D, H, W) of FLARE's training volumes (``finetune_flare.py``'s default, which its script keeps)."""
FLARE_PRETRAINED_DIR = "pretrained"
FLARE_VISION_FILE = "vision_encoder.safetensors"
FLARE_PROJECTOR_FILE = "mm_projector.safetensors"
MODEL_DIR = "model"

UNUSED_KEYS: tuple[re.Pattern[str], ...] = (
    # DistilBERT's position-id buffer (non-persistent today; older exports wrote it).
    re.compile(r"language_encoder\.embeddings\.position_ids"),
    # Rotary inverse frequencies, recomputed from the config (older exports wrote them).
    re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
)
"""Keys that may appear in a released checkpoint and are deliberately not loaded."""

# Fields ``VLMQwenConfig`` adds to ``Qwen2Config`` (vision side, read here, not passed to the LLM)
# and the generic metadata transformers writes.
VLM_ONLY_FIELDS = (
    "vision_tower",
    "vision_select_layer",
    "vision_select_feature",
    "input_size",
    "patch_size",
    "dim",
    "depth",
    "mm_projector_type",
    "mm_mlp_depth",
    "proj_out_num",
    "low_output_size",
    "high_output_size",
    "low_input_size",
    "high_input_size",
    "mm_hidden_size",
    "img_token_id",
    "tune_mm_mlp_adapter",
    "model_type",
    "architectures",
    "auto_map",
    "transformers_version",
    "torch_dtype",
    "dtype",
)

SiglipScale = Literal["exp", "linear"]
ExportConfig = Mapping[str, Any]
V = TypeVar("V")


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint folder known from its headers alone: where each key's tensor lies."""

    listing: Path
    """The file that lists the keys: the shard index, or the single ``model.safetensors``."""
    entries: Mapping[str, tuple[Path, TensorEntry]]

    def shapes(self) -> dict[str, Tensor]:
        """Every key as a meta tensor of its dtype and shape (what the key and shape checks take)."""
        return {
            key: torch.empty(entry.shape, dtype=entry.dtype, device="meta")
            for key, (_, entry) in self.entries.items()
        }

    def file(self, key: str) -> Path:
        return self.entries[key][0]

    def read(self, key: str) -> Tensor:
        return read_tensor(*self.entries[key])

    def pieces(self, key: str) -> Iterator[Tensor]:
        """``key``'s tensor as flat pieces of bounded size (:func:`read_pieces`)."""
        return read_pieces(*self.entries[key])


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint | None:
    """The safetensors checkpoint of ``folder`` (``model.safetensors``, or shards listed in
    ``model.safetensors.index.json``) from its headers; ``None`` when the folder has neither."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return Checkpoint(
            index, _sharded(index, lambda path: {k: (path, e) for k, e in read_header(path).items()})
        )
    single = folder / "model.safetensors"
    if single.is_file():
        return Checkpoint(single, {key: (single, entry) for key, entry in read_header(single).items()})
    return None


def read_checkpoint(folder: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder: safetensors (:func:`open_checkpoint`) or ``pytorch_model.bin``
    (single or sharded with ``pytorch_model.bin.index.json``, ``weights_only``), in that order."""
    folder = Path(folder)
    checkpoint = open_checkpoint(folder)
    if checkpoint is not None:
        return {key: checkpoint.read(key) for key in checkpoint.entries}

    def load(path: Path) -> dict[str, Tensor]:
        return torch.load(path, weights_only=True)

    if (folder / "pytorch_model.bin.index.json").is_file():
        return _sharded(folder / "pytorch_model.bin.index.json", load)
    if (folder / "pytorch_model.bin").is_file():
        return dict(load(folder / "pytorch_model.bin"))
    raise FileNotFoundError(
        f"{folder}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json); "
        "download the released folder with `huggingface-cli download <repo> --local-dir <folder>`"
    )


def _sharded(index: Path, read_shard: Callable[[Path], Mapping[str, V]]) -> dict[str, V]:
    """``read_shard(file)`` of every shard the index lists, merged; each shard's keys must be the ones the
    index lists for it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index}: not a shard index with a weight_map ({error})") from error
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map is not a map of key -> shard file")
    state: dict[str, V] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard:
            raise ValueError(f"{index}: shard {shard!r} is not a file name beside the index")
        path = index.parent / shard
        if not path.is_file():
            raise FileNotFoundError(f"{index}: shard {shard} is listed but missing")
        for key, value in read_shard(path).items():
            if weight_map.get(key) != shard:
                raise ReferenceLayoutError(
                    f"{path}: key {key!r} is not listed for this shard in {index.name}"
                )
            state[key] = value
    missing = [key for key in weight_map if key not in state]
    if missing:
        raise ReferenceLayoutError(
            f"{index}: key {missing[0]!r} is listed but not in {weight_map[missing[0]]}"
        )
    return state


def read_original_config(folder: str | os.PathLike, model_type: str) -> dict[str, Any]:
    """The original's ``config.json``, checked to be of ``model_type``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the released folder ships the original's config.json")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("model_type") != model_type:
        raise ValueError(f"{path}: model_type {config.get('model_type')!r}, expected {model_type!r}")
    return config


def _field(config: Mapping[str, Any], name: str, where: Path) -> Any:
    if name not in config:
        raise ValueError(f"{where / 'config.json'}: field {name!r} missing")
    return config[name]


def to_float32(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Floating tensors as float32, others unchanged."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def original_input_size(input_size: Sequence[int]) -> list[int]:
    """The original's ``input_size`` lists (H, W, D) (its encoder's internal frame); ours is (D, H, W)."""
    if len(input_size) != 3:
        raise ValueError(f"input_size {list(input_size)}: expected three sizes")
    height, width, depth = (int(n) for n in input_size)
    return [depth, height, width]


# --- key accounting -----------------------------------------------------------------------------


def split_state(
    state: Mapping[str, Tensor],
    prefixes: Mapping[str, str | tuple[str, ...]],
    exact: Sequence[str],
    source: str,
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], list[str]]:
    """Assign every key to the first group with a matching prefix (or tuple of prefixes), to the
    ``exact`` keys, or to ``UNUSED_KEYS``.

    Returns the groups (prefix kept), the exact entries and the unused keys; any other key, and
    any missing exact key, is an error naming it.
    """
    groups: dict[str, dict[str, Tensor]] = {name: {} for name in prefixes}
    singles: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, value in state.items():
        if any(pattern.fullmatch(key) for pattern in UNUSED_KEYS):
            unused.append(key)
        elif key in exact:
            singles[key] = value
        else:
            group = next((name for name, prefix in prefixes.items() if key.startswith(prefix)), None)
            if group is None:
                raise ReferenceLayoutError(f"key {key!r} is not part of the {source} layout")
            groups[group][key] = value
    for key in exact:
        if key not in singles:
            raise ReferenceLayoutError(f"the {source} checkpoint has no key {key!r}")
    for name, prefix in prefixes.items():
        if not groups[name]:
            raise ReferenceLayoutError(
                f"the {source} checkpoint has no key starting with {prefix!r} ({name})"
            )
    return groups, singles, unused


def load_prefixed_strict(module: nn.Module, state: Mapping[str, Tensor], prefix: str) -> None:
    """Load ``state`` (keys = ``prefix`` + ``module``'s keys) into ``module`` with assignment (works
    for modules on the meta device); extra, mis-shaped and missing keys name the first offender."""
    expected = module.state_dict()
    stripped: dict[str, Tensor] = {}
    for key, value in state.items():
        ours = key[len(prefix) :]
        if ours not in expected:
            raise ReferenceLayoutError(
                f"key {key!r} does not exist in the configured {type(module).__name__}"
            )
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ReferenceLayoutError(
                f"key {key!r}: shape {list(value.shape)} but the configured {type(module).__name__} "
                f"expects {list(expected[ours].shape)}"
            )
        stripped[ours] = value.to(expected[ours].dtype)
    for ours in expected:
        if ours not in stripped:
            raise ReferenceLayoutError(
                f"the checkpoint has no key {prefix + ours!r} ({type(module).__name__})"
            )
    module.load_state_dict(stripped, strict=True, assign=True)


def _check_shape(key: str, value: Tensor, shape: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(shape):
        raise ReferenceLayoutError(f"key {key!r}: shape {list(value.shape)}, expected {list(shape)}")


def _build_encoder(encoder_config: ExportConfig, state: Mapping[str, Tensor], prefix: str) -> nn.Module:
    encoder = instantiate(dict(encoder_config))
    load_reference_state_dict(encoder, state, prefix)
    return encoder.eval()


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


# --- SigLIP (DEC_CLIP) --------------------------------------------------------------------------


def log_scale_from_t_prime(t_prime: float, siglip_scale: SiglipScale) -> float:
    """Our ``log_scale`` for the original's ``t_prime`` (see the module docstring)."""
    if siglip_scale == "exp":
        return t_prime
    if siglip_scale == "linear":
        if t_prime <= 0:
            raise ValueError(f"t_prime={t_prime} <= 0 has no log; the linear reading is impossible")
        return math.log(t_prime)
    raise ValueError(f"siglip_scale={siglip_scale!r}: expected 'exp' or 'linear'")


def import_siglip(
    source: str | os.PathLike,
    out: str | os.PathLike,
    encoder_config: ExportConfig,
    text_model: str | None = None,
    siglip_scale: SiglipScale = "exp",
    experiment: str = "imported",
) -> Path:
    """Convert a ``DEC_CLIP`` release folder; see the module docstring for what lands in ``out``
    (written whole or not at all).

    ``encoder_config``: the ``_target_`` node of our encoder (the release uses DCFormer-small).
    ``text_model``: Hub name or folder with the text encoder's config (the release does not ship
    it); ``None`` = the original config's ``language_model_name_or_path`` (medicalai/ClinicalBERT).
    """
    source = Path(source)
    config = _siglip_config(source)
    state = to_float32(read_checkpoint(source))
    groups, singles, unused = split_state(
        state,
        {"vision": SIGLIP_VISION_PREFIX, "text": SIGLIP_TEXT_PREFIX},
        SIGLIP_HEADS + SIGLIP_SCALARS,
        "DEC_CLIP",
    )
    encoder = _build_encoder(encoder_config, groups["vision"], SIGLIP_VISION_PREFIX)
    text_source = str(text_model or _field(config, "language_model_name_or_path", source))
    # Built for real (~135M parameters for ClinicalBERT): its non-persistent buffers need values.
    language_encoder = AutoModel.from_config(AutoConfig.from_pretrained(text_source))
    load_prefixed_strict(language_encoder, groups["text"], SIGLIP_TEXT_PREFIX)
    hidden = int(_field(config, "hidden_size", source))
    heads = _siglip_heads(
        singles, hidden, int(encoder.out_channels[-1]), int(language_encoder.config.hidden_size), siglip_scale
    )
    tokenizer_source = source if (source / "tokenizer_config.json").is_file() else text_source
    record = {
        "kind": "siglip",
        "source": str(source),
        "original_config": config,
        "siglip_scale": siglip_scale,
        "t_prime": float(singles["t_prime"]),
        "created": time.time(),
        "embed_dim": hidden,
        "text_model_config": text_source,
        "tokenizer": str(tokenizer_source),
        "keys": {"vision": len(groups["vision"]), "text": len(groups["text"]), "heads": len(singles)},
        "unused_keys": unused,
    }
    with atomic_folder(out, IMPORT_FILE) as staging:
        language_encoder.save_pretrained(staging / TEXT_ENCODER_DIR)
        AutoTokenizer.from_pretrained(str(tokenizer_source)).save_pretrained(staging / TEXT_ENCODER_DIR)
        save_tensors(staging / HEADS_FILE, heads)
        exported = ArtifactRecord(
            "encoder_export",
            experiment,
            original_input_size(_field(config, "input_size", source)),
            m3d_preprocessing(),
            {"encoder": dict(encoder_config)},
            stage="siglip",
            which="final",
            text_pooling="first",
            extra={"imported_from": str(source)},
        )
        write_encoder_export(staging / IMPORTED_ENCODER_DIR, encoder, exported)
        _write_json(staging / IMPORT_FILE, record)
    return Path(out)


def _siglip_config(source: Path) -> dict[str, Any]:
    """The release's ``config.json``, checked to be the sigmoid-loss DCFormer model we import."""
    config = read_original_config(source, "dec_clip")
    if _field(config, "loss_type", source) != "sigmoid":
        raise ValueError(
            f"{source / 'config.json'}: loss_type {config['loss_type']!r}; only 'sigmoid' is imported"
        )
    if _field(config, "vision_encoder", source) != "dcformer":
        raise ValueError(
            f"{source / 'config.json'}: vision_encoder {config['vision_encoder']!r}; expected 'dcformer'"
        )
    return config


def _siglip_heads(
    singles: Mapping[str, Tensor], hidden: int, vision_width: int, text_width: int, siglip_scale: SiglipScale
) -> dict[str, Tensor]:
    """Both projection heads and the loss's scale and bias under the SigLIP stage's names, their
    shapes checked against the towers."""
    for name, width in (("mm_vision_proj", vision_width), ("mm_language_proj", text_width)):
        _check_shape(f"{name}.weight", singles[f"{name}.weight"], (hidden, width))
        _check_shape(f"{name}.bias", singles[f"{name}.bias"], (hidden,))
    for name in SIGLIP_SCALARS:
        if singles[name].numel() != 1:
            raise ReferenceLayoutError(f"key {name!r}: shape {list(singles[name].shape)}, expected a scalar")
    return {
        "image_tower.mm_vision_proj.weight": singles["mm_vision_proj.weight"],
        "image_tower.mm_vision_proj.bias": singles["mm_vision_proj.bias"],
        "text_tower.mm_language_proj.weight": singles["mm_language_proj.weight"],
        "text_tower.mm_language_proj.bias": singles["mm_language_proj.bias"],
        "loss.log_scale": torch.tensor([log_scale_from_t_prime(float(singles["t_prime"]), siglip_scale)]),
        "loss.bias": singles["bias"].reshape(1),
    }


# --- the merged VLM (VLMQwenForCausalLM) ----------------------------------------------------------


def qwen2_config(config: Mapping[str, Any]) -> Qwen2Config:
    """The LLM's ``Qwen2Config``: the original config without its vision fields and metadata."""
    return Qwen2Config(**{k: v for k, v in config.items() if k not in VLM_ONLY_FIELDS})


def _check_llm(checkpoint: Checkpoint, found: Mapping[str, Tensor], llm: Qwen2ForCausalLM) -> None:
    """The release's LLM tensors (``found``, from the headers) against those the configured Qwen2 saves:
    the same names and shapes, floating point where its are; the first that does not fit is named with
    its file."""
    expected = saved_tensors(llm)
    for key, value in found.items():
        where = checkpoint.file(key)
        if key not in expected:
            raise ReferenceLayoutError(
                f"{where}: key {key!r} does not exist in the configured {type(llm).__name__}"
            )
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ReferenceLayoutError(
                f"{where}: key {key!r}: shape {list(value.shape)} but the configured {type(llm).__name__} "
                f"expects {list(expected[key].shape)}"
            )
        if value.dtype.is_floating_point != expected[key].dtype.is_floating_point:
            raise ReferenceLayoutError(
                f"{where}: key {key!r}: dtype {value.dtype}, expected {expected[key].dtype}"
            )
    missing = next((key for key in expected if key not in found), None)
    if missing is not None:
        raise ReferenceLayoutError(
            f"{checkpoint.listing}: the checkpoint has no key {missing!r} ({type(llm).__name__})"
        )


def original_projector_config(
    projector_config: ExportConfig, config: Mapping[str, Any], where: Path
) -> dict[str, Any]:
    """Our projector node with the original's Mixer sizes (``{low,high}_output_size``, ``mm_mlp_depth``)."""
    if _field(config, "mm_projector_type", where) != "mixer":
        raise ValueError(
            f"{where / 'config.json'}: mm_projector_type {config['mm_projector_type']!r}; expected 'mixer'"
        )
    low, high = (
        list(_field(config, "low_output_size", where)),
        list(_field(config, "high_output_size", where)),
    )
    return {
        **projector_config,
        "low_tokens": low,
        "high_tokens": high,
        "depth": len(low),
        "mlp_depth": int(_field(config, "mm_mlp_depth", where)),
    }


def _vlm_config(source: Path) -> dict[str, Any]:
    """The merged release's ``config.json``, checked to be the DCFormer ``VLMQwenForCausalLM`` we import."""
    config = read_original_config(source, "vlm_qwen")
    if _field(config, "vision_tower", source) != "dcformer":
        raise ValueError(
            f"{source / 'config.json'}: vision_tower {config['vision_tower']!r}; expected 'dcformer'"
        )
    return config


@dataclass(frozen=True)
class _MergedRelease:
    """A merged release checked from its headers: vision tower and projector loaded (float32), the LLM
    on the meta device, its weights still in the checkpoint until the model folder is written."""

    checkpoint: Checkpoint
    vision_tower: nn.Module
    projector: nn.Module
    projector_config: dict[str, Any]
    llm: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerBase
    image_token: str
    reference_placement: bool
    facts: dict[str, Any]
    """What import.json records of it: image-token id, placement, key counts, unused keys."""

    def write(
        self, path: Path, record: ArtifactRecord, write_files: Callable[[Path], None] | None = None
    ) -> Path:
        """The model folder ``path``; the LLM's tensors are copied from the checkpoint one piece at a
        time, as float32, into ``llm/`` (:func:`write_llm_streamed`)."""
        return write_model_folder(
            path,
            record,
            lambda folder: write_llm_streamed(folder, self.llm, self.checkpoint.pieces, LLM_SHARD_SIZE),
            self.tokenizer,
            self.vision_tower,
            self.projector,
            self.image_token,
            self.reference_placement,
            write_files,
        )


def _merged_vlm(
    source: Path,
    config: Mapping[str, Any],
    encoder_config: ExportConfig,
    projector_node: Mapping[str, Any],
    input_size: Sequence[int],
    reference_placement: bool,
    image_token: str,
) -> _MergedRelease:
    """The merged release, strict: every key, shape and floating dtype is checked from the safetensors
    headers before any tensor is read; then only the vision tower's and projector's are read."""
    checkpoint = open_checkpoint(source)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{source}: no model.safetensors(.index.json); the merged model is read from safetensors, "
            "tensor by tensor (a pytorch_model.bin is not: convert it once, where you trust it)"
        )
    with _naming(checkpoint.listing):
        groups, _, unused = split_state(
            checkpoint.shapes(),
            {"vision": VLM_VISION_PREFIX, "projector": VLM_PROJECTOR_PREFIX, "llm": ("model.", "lm_head.")},
            (),
            "VLMQwenForCausalLM",
        )
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(qwen2_config(config))
    _check_llm(checkpoint, groups["llm"], llm)
    rows, hidden = llm.get_input_embeddings().weight.shape
    vision_tower = instantiate(dict(encoder_config))
    projector, proj_built = _released_projector(
        projector_node, config, source, vision_tower, input_size, hidden
    )
    parts = ((vision_tower, "vision", VLM_VISION_PREFIX), (projector, "projector", VLM_PROJECTOR_PREFIX))
    with _naming(checkpoint.listing):
        for module, group, prefix in parts:
            convert_state_dict(groups[group], module, rules_for(module), prefix)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    token_id = _image_token_id(tokenizer, image_token, rows, source)
    for module, group, prefix in parts:
        load_reference_state_dict(module, to_float32({k: checkpoint.read(k) for k in groups[group]}), prefix)
        module.eval()
    facts = {
        "image_token_id": token_id,
        "reference_placement": reference_placement,
        "keys": {name: len(group) for name, group in groups.items()},
        "unused_keys": unused,
    }
    return _MergedRelease(
        checkpoint,
        vision_tower,
        projector,
        proj_built,
        llm,
        tokenizer,
        image_token,
        reference_placement,
        facts,
    )


def import_vlm(
    source: str | os.PathLike,
    out: str | os.PathLike,
    encoder_config: ExportConfig,
    projector_config: ExportConfig,
    reference_placement: bool = True,
    image_token: str = IMAGE_TOKEN,
) -> Path:
    """Convert a merged ``VLMQwenForCausalLM`` release folder into a model folder (``load_pretrained``).

    ``encoder_config`` / ``projector_config``: our ``_target_`` nodes (DCFormer-small, Mixer); the
    Mixer's sizes come from the original config. ``reference_placement``: the original's image-token
    placement, on for the released weights (they were trained with it).
    """
    source = Path(source)
    config = _vlm_config(source)
    input_size = original_input_size(_field(config, "input_size", source))
    release = _merged_vlm(
        source,
        config,
        encoder_config,
        original_projector_config(projector_config, config, source),
        input_size,
        reference_placement,
        image_token,
    )
    record = {
        "kind": "vlm",
        "source": str(source),
        "original_config": config,
        "created": time.time(),
        **release.facts,
    }
    # The release was trained on M3D (its prompts, its preprocessing). import.json is written before the
    # folder's record, so the record's fingerprint covers it.
    folder = ArtifactRecord(
        "model_folder",
        "imported",
        input_size,
        m3d_preprocessing(),
        {"vision_tower": dict(encoder_config), "projector": release.projector_config},
        prompt_format="m3d",
        extra={"imported_from": str(source)},
    )
    return release.write(
        Path(out), folder, write_files=lambda staging: _write_json(staging / IMPORT_FILE, record)
    )


def _released_projector(
    node: Mapping[str, Any],
    config: Mapping[str, Any],
    source: Path,
    vision_tower: nn.Module,
    input_size: Sequence[int],
    hidden: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """The Mixer built at the sizes our encoder gives, which must be the release's, and its config."""
    projector, built = build_projector(node, vision_tower, input_size, hidden)
    for name, key in (("low", "low_input_size"), ("high", "high_input_size")):
        sizes = list(getattr(projector, f"{name}_size"))
        if key in config and list(config[key]) != sizes:
            raise ValueError(
                f"{source / 'config.json'}: {key} {config[key]} but the configured encoder at input size "
                f"{input_size} gives {sizes}; choose the encoder variant / input size the release used"
            )
    return projector, built


def _image_token_id(tokenizer: PreTrainedTokenizerBase, image_token: str, rows: int, source: Path) -> int:
    """The release tokenizer's id of ``image_token``, which must index the embedding matrix."""
    if image_token not in tokenizer.get_vocab():
        raise ValueError(f"{source}: the saved tokenizer has no {image_token!r} token")
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id >= rows:
        raise ValueError(
            f"{source}: {image_token} has id {token_id} but the embedding matrix has {rows} rows"
        )
    return token_id


# --- the FLARE 2025 release (merged VLM + the stage-2 weights its finetune started from) ---------------


def flare_input_size(config: Mapping[str, Any], source: Path) -> tuple[int, int, int]:
    """The FLARE release's volume size (D, H, W): its config's ``input_size`` as it stands (FLARE's
    training resizes the data to it, unlike the M3D release's (H, W, D) encoder frame), else
    :data:`FLARE_INPUT_SIZE`."""
    size = [int(n) for n in config.get("input_size", FLARE_INPUT_SIZE)]
    if len(size) != 3:
        raise ValueError(f"{source / 'config.json'}: input_size {size}: expected three sizes")
    depth, height, width = size
    return depth, height, width


def safetensors_shapes(path: Path) -> dict[str, Tensor]:
    """The entries of the safetensors file ``path`` as meta tensors of their shapes, from its header
    alone. Anything else is refused and never unpickled: the original wrote these files with
    ``torch.save`` although it named them ``.safetensors``, and unpickling runs code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the FLARE release ships it")
    try:
        with safe_open(str(path), framework="pt") as file:
            names = file.keys()  # a safe_open handle is not iterable
            return {key: torch.empty(file.get_slice(key).get_shape(), device="meta") for key in names}
    except SafetensorError as error:
        raise ValueError(
            f"{path}: not a safetensors file ({error}); a torch pickle under this name is not loaded "
            "(unpickling runs code): convert it to safetensors once, where you trust it"
        ) from error


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Layout errors raised inside name ``path`` too (the key-level checks know only the key)."""
    try:
        yield
    except ReferenceLayoutError as error:
        raise ReferenceLayoutError(f"{path}: {error}") from error


def _check_image_token_row(path: Path, shape: Sequence[int], llm: str) -> None:
    """``model.embed_tokens.weight`` of ``path`` must hold the base tokenizer's rows (``llm``'s) plus
    one, the ``<im_patch>`` row the original appended."""
    if len(shape) != 2:
        raise ReferenceLayoutError(
            f"{path}: key {EMBEDDING_KEY!r}: shape {list(shape)}, expected (rows, hidden)"
        )
    base = AutoTokenizer.from_pretrained(llm)
    if IMAGE_TOKEN in base.get_vocab():
        raise ValueError(f"llm={llm}: its tokenizer already has {IMAGE_TOKEN}; pass the base LLM")
    if shape[0] != len(base) + 1:
        raise ReferenceLayoutError(
            f"{path}: key {EMBEDDING_KEY!r} has {shape[0]} rows, but the tokenizer of llm={llm} has "
            f"{len(base)} entries and {IMAGE_TOKEN} appended makes {len(base) + 1}; pass the base LLM "
            "the release was trained on"
        )


def _read_into(module: nn.Module, path: Path, keys: Mapping[str, Tensor], prefix: str) -> None:
    """Read ``keys`` (checked already) from the safetensors ``path`` into ``module``, as float32."""
    with safe_open(str(path), framework="pt") as file:
        state = to_float32({key: file.get_tensor(key) for key in keys})
    with _naming(path):
        load_reference_state_dict(module, state, prefix)
    module.eval()


def _flare_handoff(
    folder: Path,
    encoder_config: ExportConfig,
    projector_node: Mapping[str, Any],
    input_size: Sequence[int],
    llm: str,
    reference_placement: bool,
) -> tuple[ArtifactRecord, dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The projector hand-off of the release's ``pretrained/`` files: its record, its tensors, and what
    import.json records of it. Strict: every key and shape of both files is checked from their headers
    before any tensor is read; of the embedding only the ``<im_patch>`` row is read."""
    vision_path, projector_path = folder / FLARE_VISION_FILE, folder / FLARE_PROJECTOR_FILE
    vision_header, projector_header = safetensors_shapes(vision_path), safetensors_shapes(projector_path)
    with _naming(vision_path):
        vision, _, vision_unused = split_state(vision_header, {"vision": "encoder."}, (), "vision_encoder")
    with _naming(projector_path):
        projector_keys, embedding, projector_unused = split_state(
            projector_header, {"projector": VLM_PROJECTOR_PREFIX}, (EMBEDDING_KEY,), "mm_projector"
        )
    shape = tuple(embedding[EMBEDDING_KEY].shape)
    _check_image_token_row(projector_path, shape, llm)
    rows, hidden = shape
    vision_tower = instantiate(dict(encoder_config))
    projector, built = build_projector(projector_node, vision_tower, input_size, hidden)
    parts = (
        (vision_tower, vision_path, vision["vision"], ""),
        (projector, projector_path, projector_keys["projector"], VLM_PROJECTOR_PREFIX),
    )
    for module, path, keys, prefix in parts:
        with _naming(path):
            convert_state_dict(keys, module, rules_for(module), prefix)
    for part in parts:
        _read_into(*part)
    with safe_open(str(projector_path), framework="pt") as file:
        row = file.get_slice(EMBEDDING_KEY)[rows - 1 : rows].reshape(hidden).float()
    record = ArtifactRecord(
        "projector_handoff",
        FLARE_EXPERIMENT,
        input_size,
        flare_preprocessing(),
        {"vision_tower": dict(encoder_config), "projector": built},
        prompt_format="flare",
        image_token=IMAGE_TOKEN,
        num_image_tokens=int(projector.num_tokens),
        reference_placement=reference_placement,
        llm=llm,
        stage="pretrain",
        extra={"imported_from": str(folder)},
    )
    tensors = {
        VISION_TOWER_FILE: vision_tower.state_dict(),
        PROJECTOR_FILE: projector.state_dict(),
        IMAGE_TOKEN_FILE: {"embedding": row},
    }
    facts = {
        "source": str(folder),
        "llm": llm,
        "image_token_row": rows - 1,
        "reference_placement": reference_placement,
        "keys": {FLARE_VISION_FILE: len(vision["vision"]), FLARE_PROJECTOR_FILE: len(projector_header)},
        # Of the embedding only the <im_patch> row is kept: the other rows are the base LLM's, which the
        # original's finetune takes from the base LLM too.
        "unused_keys": [*vision_unused, *projector_unused],
    }
    return record, tensors, facts


def import_flare(
    source: str | os.PathLike,
    out: str | os.PathLike,
    encoder_config: ExportConfig,
    projector_config: ExportConfig,
    llm: str = FLARE_BASE_LLM,
    reference_placement: bool = True,
) -> Path:
    """Convert the FLARE 2025 release folder into ``out/model`` (model folder), ``out/pretrained``
    (projector hand-off) and ``out/import.json``, written whole or not at all; strict, float32.

    Both record FLARE's prompt format and two-source preprocessing (what the release was trained on)
    and the volume size of its config (:func:`flare_input_size`). The model folder keeps the
    original's image placement (its weights were trained with it; ``load_pretrained`` can override
    it); ``reference_placement`` is the placement a finetune from the hand-off continues with.
    ``llm``: the base LLM the hand-off is rebuilt on (its tokenizer locates the ``<im_patch>`` row).
    """
    source = Path(source)
    config = _vlm_config(source)
    input_size = flare_input_size(config, source)
    projector_node = original_projector_config(projector_config, config, source)
    # The small pretrained/ files first: a wrong one fails before the 7B model is read.
    handoff, handoff_tensors, handoff_facts = _flare_handoff(
        source / FLARE_PRETRAINED_DIR, encoder_config, projector_node, input_size, llm, reference_placement
    )
    release = _merged_vlm(source, config, encoder_config, projector_node, input_size, True, IMAGE_TOKEN)
    folder = ArtifactRecord(
        "model_folder",
        FLARE_EXPERIMENT,
        input_size,
        flare_preprocessing(),
        {"vision_tower": dict(encoder_config), "projector": release.projector_config},
        prompt_format="flare",
        extra={"imported_from": str(source)},
    )
    record = {
        "kind": "flare",
        "source": str(source),
        "original_config": config,
        "created": time.time(),
        MODEL_DIR: release.facts,
        FLARE_PRETRAINED_DIR: handoff_facts,
    }
    with atomic_folder(out, IMPORT_FILE) as staging:
        release.write(staging / MODEL_DIR, folder)
        write_handoff(staging / FLARE_PRETRAINED_DIR, handoff, handoff_tensors)
        _write_json(staging / IMPORT_FILE, record)
    return Path(out)
