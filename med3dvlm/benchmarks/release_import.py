"""Import section (``bench --only import``): importing a merged release the size of
Med3DVLM-Qwen-2.5-7B, its peak resident memory and wall time.

The release has Qwen2.5-7B-Instruct's tensor names and shapes (its config; the LLM built on the meta
device), random bfloat16 values, in shards of at most 4 GB as Hugging Face ships that model (four),
plus DCFormer-small and the paper's Mixer in the original's key layout. It is written to the
temporary folder (``TMPDIR``); ``python -m med3dvlm.import_weights kind=vlm`` then imports it in a
child process, whose peak resident set (``ru_maxrss``) and wall time are measured. It needs about
46 GB of free disk (15 GB release, 31 GB float32 model folder), removed afterwards. ``--quick``: 2 of
the 28 decoder layers (every tensor shape kept, the largest included).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from med3dvlm.artifacts.llm_stream import saved_tensors
from med3dvlm.artifacts.released import VLM_PROJECTOR_PREFIX, VLM_VISION_PREFIX
from med3dvlm.benchmarks import BenchOptions, BenchRow
from med3dvlm.configs import CONFIG_DIR
from med3dvlm.models.build import build_projector
from med3dvlm.models.reference_layout import to_reference_state_dict
from med3dvlm.models.tiny_qwen import train_tokenizer
from med3dvlm.models.vlm import IMAGE_TOKEN
from med3dvlm.utils.safetensors_stream import PIECE_BYTES, write_safetensors

SECTION = "import"
QWEN2_5_7B_INSTRUCT: dict[str, object] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
"""The fields of Qwen2.5-7B-Instruct's config.json that shape its tensors."""
RELEASE_DTYPE = torch.bfloat16
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


@dataclass(frozen=True)
class ReleaseShape:
    """What the benchmark's release is: its LLM's config, the encoder config group and volume size
    (D, H, W) it was trained at, the Mixer's token counts, the largest shard."""

    llm: Qwen2Config
    encoder: str = "dcformer_small"
    input_size: tuple[int, int, int] = (128, 256, 256)
    low_tokens: tuple[int, ...] = (192, 128)
    high_tokens: tuple[int, ...] = (64, 128)
    shard_size: str = "4GB"


def run(options: BenchOptions) -> list[BenchRow]:
    config = Qwen2Config(**{**QWEN2_5_7B_INSTRUCT, **({"num_hidden_layers": 2} if options.quick else {})})
    with tempfile.TemporaryDirectory(prefix="med3dvlm-bench-import-") as workdir:
        return measure_import(ReleaseShape(config), Path(workdir))


def measure_import(shape: ReleaseShape, workdir: Path) -> list[BenchRow]:
    """Write the release into ``workdir``, import it there in a child process, and measure that."""
    release, out = workdir / "release", workdir / "imported"
    release_bytes, parameters = write_release(release, shape)
    command = [
        sys.executable,
        "-m",
        "med3dvlm.import_weights",
        "kind=vlm",
        f"source={release}",
        f"out={out}",
        f"encoder={shape.encoder}",
        f"hydra.run.dir={workdir / 'run'}",
    ]
    seconds, peak = _peak_and_seconds(command, workdir / "import.log")
    folder_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    what = (
        f"{parameters / 1e9:.2f}B parameters, Qwen2.5-7B-Instruct shapes with "
        f"{shape.llm.num_hidden_layers} decoder layers"
    )
    return [
        BenchRow(SECTION, "import_weights kind=vlm: peak resident memory", peak / 2**30, "GiB", what),
        BenchRow(SECTION, "import_weights kind=vlm: wall time", seconds, "s", "the whole command"),
        BenchRow(SECTION, "release read", release_bytes / 1e9, "GB", "bfloat16 safetensors shards"),
        BenchRow(SECTION, "model folder written", folder_bytes / 1e9, "GB", "float32, llm/ sharded"),
    ]


def _peak_and_seconds(command: list[str], log: Path) -> tuple[float, int]:
    """Wall seconds and peak resident bytes of ``command`` run as a child (its output into ``log``)."""
    start = time.perf_counter()
    with log.open("wb") as output:
        child = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}):\n{tail}")
    return seconds, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB on Linux


def write_release(folder: Path, shape: ReleaseShape) -> tuple[int, int]:
    """Write the merged release ``shape`` describes into ``folder`` (module docstring), one piece of
    one tensor in memory at a time; return its size in bytes and its parameter count."""
    encoder = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "encoder" / f"{shape.encoder}.yaml"))
    projector_node = {
        **OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "projector" / "mixer.yaml")),
        "low_tokens": list(shape.low_tokens),
        "high_tokens": list(shape.high_tokens),
        "depth": len(shape.low_tokens),
    }
    vision_tower = instantiate(encoder)
    projector, _ = build_projector(projector_node, vision_tower, shape.input_size, shape.llm.hidden_size)
    fixed = {
        key: value.to(RELEASE_DTYPE) if value.is_floating_point() else value
        for module, prefix in ((vision_tower, VLM_VISION_PREFIX), (projector, VLM_PROJECTOR_PREFIX))
        for key, value in to_reference_state_dict(module, prefix).items()
    }
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(shape.llm)
    tensors = {
        **{key: value.to(RELEASE_DTYPE) for key, value in saved_tensors(llm).items()},
        **{key: value.to("meta") for key, value in fixed.items()},
    }
    needed = sum(t.numel() for t in tensors.values()) * (RELEASE_DTYPE.itemsize + 4) * 1.05
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        raise RuntimeError(
            f"{folder.parent}: {free / 1e9:.1f} GB free, the import benchmark needs {needed / 1e9:.1f} GB "
            "(the release and the float32 model folder); set TMPDIR to a larger disk, or use --quick"
        )
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)

    def pieces(name: str) -> Iterable[torch.Tensor]:
        if name in fixed:
            return [fixed[name]]
        return _random_pieces(tensors[name].numel(), generator)

    split = split_torch_state_dict_into_shards(
        tensors,
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=shape.shard_size,
    )
    for file, names in split.filename_to_tensors.items():
        tensor_shapes = {name: (tensors[name].dtype, tensors[name].shape) for name in names}
        write_safetensors(folder / file, tensor_shapes, pieces, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
    tokenizer = train_tokenizer(["describe the findings of this scan", "no abnormality"], 300)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.save_pretrained(folder)
    depth, height, width = shape.input_size
    config = {
        **shape.llm.to_dict(),
        "model_type": "vlm_qwen",
        "architectures": ["VLMQwenForCausalLM"],
        "torch_dtype": "bfloat16",
        "vision_tower": "dcformer",
        "vision_select_layer": -2,
        "input_size": [height, width, depth],  # the original's (H, W, D)
        "mm_projector_type": "mixer",
        "mm_mlp_depth": projector_node["mlp_depth"],
        "proj_out_num": int(projector.num_tokens),
        "low_output_size": list(shape.low_tokens),
        "high_output_size": list(shape.high_tokens),
        "low_input_size": list(projector.low_size),
        "high_input_size": list(projector.high_size),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    size = sum(p.stat().st_size for p in folder.iterdir())
    return size, sum(t.numel() for t in tensors.values())


def _random_pieces(numel: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``numel`` values drawn as a released weight (normal, std 0.02), in pieces of bounded size."""
    step = PIECE_BYTES // 4
    for start in range(0, numel, step):
        values = torch.empty(min(step, numel - start)).normal_(0.0, 0.02, generator=generator)
        yield values.to(RELEASE_DTYPE)
