"""A Hugging Face LLM folder written tensor by tensor: the files ``PreTrainedModel.save_pretrained``
writes (``config.json``, ``generation_config.json``, the safetensors shards and their index), byte
for byte, for a model built on the meta device whose weights come from elsewhere (a release being
imported), so that no more than a piece of one tensor is in memory at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from huggingface_hub import split_torch_state_dict_into_shards
from torch import Tensor
from transformers import PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from med3dvlm.utils.safetensors_stream import write_safetensors


def saved_tensors(llm: PreTrainedModel) -> dict[str, Tensor]:
    """The tensors ``save_pretrained`` writes for ``llm``, in its order: the state dict less tied
    aliases (meta tensors for a model on the meta device: names, shapes, dtypes)."""
    return remove_tied_weights_from_state_dict(llm.state_dict(), llm)


def write_llm_streamed(
    folder: Path,
    llm: PreTrainedModel,
    pieces: Callable[[str], Iterable[Tensor]],
    max_shard_size: str,
) -> None:
    """Write ``llm`` (on the meta device) as ``llm.save_pretrained(folder, max_shard_size=...)`` would,
    the data of each saved tensor from ``pieces(name)`` (in order, cast here to the model's dtype)."""
    folder.mkdir(parents=True, exist_ok=True)
    # What save_pretrained records before writing the configs.
    llm.config.dtype = str(llm.dtype).split(".")[1]
    llm.config.architectures = [type(llm).__name__]
    llm.config.save_pretrained(folder)
    if llm.can_generate():
        llm.generation_config.save_pretrained(folder)
    tensors = saved_tensors(llm)
    split = split_torch_state_dict_into_shards(
        tensors,
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    for file, names in split.filename_to_tensors.items():
        write_safetensors(
            folder / file,
            {name: (tensors[name].dtype, tensors[name].shape) for name in names},
            lambda name: (piece.to(tensors[name].dtype) for piece in pieces(name)),
            metadata={"format": "pt"},
        )
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": llm.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / SAFE_WEIGHTS_INDEX_NAME).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
