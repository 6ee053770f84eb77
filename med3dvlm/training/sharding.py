"""FSDP2 for the training stages: the strategy behind ``trainer=fsdp``, what each stage shards, and
full weights for exports.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` used for pure data parallelism (every
process holds one shard; no tensor parallelism) plus the sharding options. A stage inherits
``ShardedStage`` and its ``configure_model`` hook applies ``fully_shard`` bottom-up:

1. transformer layers: the classes every Hugging Face model inside names in ``_no_split_modules``
   (the LLM's decoder layers, the text encoder's layers and embeddings);
2. the units every volume encoder declares (``shard_units``, :mod:`med3dvlm.models.encoder`: DCFormer's
   stages, ViT3D's blocks), then the encoder;
3. the components the stage calls directly: each child of the LightningModule with parameters (the
   VLM; the SigLIP towers and loss) and the VLM's vision tower and projector;
4. the LightningModule itself (the root).

Whatever is left (the LLM's embeddings, final norm and head, the ``<im_patch>`` row, the towers'
heads) is sharded with the smallest unit that holds it. With another strategy (single device,
``ddp``) the hook does nothing. On CPU (gloo) everything stays float32; on GPU ``param_dtype``
(bf16 by default) is the compute and all-gather dtype while the sharded master weights and the
gradient reduction (``reduce_dtype``) stay float32, except in the units that hold BatchNorm or
only a loss's scalars, which compute in float32 (see ``unit_precision``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from med3dvlm.models.encoder import volume_encoders
from med3dvlm.models.vlm import VisionLanguageModel
from med3dvlm.training.checkpointing import CorruptCheckpoint, check_checkpoint, write_shard_checksums
from med3dvlm.training.lean_checkpoint import LeanCheckpoint, check_lean_keys
from med3dvlm.training.shard_reader import RefusedCheckpointData, load_into, load_whole, read_metadata
from med3dvlm.utils.atomic import atomic_folder, atomic_path
from med3dvlm.utils.safetensors_stream import write_safetensors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"trainer.strategy.{key}={name!r}: expected one of {sorted(DTYPES)} or null")
    return DTYPES[name]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all processes; the stage's ``configure_model`` shards it.

    Args:
        param_dtype: compute / all-gather dtype on GPU (``bfloat16``, ``float16``, ``float32`` or
            ``None`` = the weights' own dtype). Ignored on CPU, which trains in float32.
        reduce_dtype: gradient reduce-scatter dtype on GPU (``None`` = ``param_dtype``).
        activation_checkpointing: recompute each transformer layer's and encoder stage's
            activations in the backward pass (less memory, about a third more compute).
        reshard_after_forward: free the gathered weights after each unit's forward (ZeRO-3);
            ``False`` keeps them until the backward pass (ZeRO-2: more memory, fewer all-gathers).
        sync_batchnorm: BatchNorm statistics over the global batch (GPU only; on CPU freeze
            BatchNorm instead, e.g. ``stage.module.freeze_bn=true``).
        save_distributed_checkpoint: checkpoints as a folder of shards (fast, every rank writes its
            own); ``False``: one file assembled on rank 0. ``python -m med3dvlm.consolidate`` turns
            a folder into one file; ``ckpt_path=`` resumes from either.
        process_group_backend: ``None`` = nccl on GPU, gloo on CPU.
    """

    def __init__(
        self,
        param_dtype: str | None = "bfloat16",
        reduce_dtype: str | None = "float32",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        sync_batchnorm: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.sync_batchnorm = sync_batchnorm

    def setup_environment(self) -> None:
        # Pure data parallelism: one data-parallel group of all processes, tensor-parallel size 1
        # (ModelParallelStrategy's "auto" would make every process of a node a tensor-parallel rank).
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        average_batchnorm_statistics(self.lightning_module)
        return output

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps it
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, optimizer, options=options)
        return positional_optimizer_state(state) if self.global_rank == 0 else {}

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        # The shards are complete once the collective save returns; the checksums go last, so a folder
        # rewritten in place and killed midway fails its check against the previous ones.
        if self._save_distributed_checkpoint and self.global_rank == 0:
            write_shard_checksums(path)

    def load_checkpoint(
        self, checkpoint_path: str | Path, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """A shard folder or one file, read as data (``med3dvlm.training.shard_reader``, ``weights_only=True``
        whatever ``weights_only`` says: checkpoints hold tensors and plain values only)."""
        path = Path(self.broadcast(checkpoint_path))
        if path.is_dir():
            return self._load_shard_folder(path)
        # One file (consolidated, or saved with save_distributed_checkpoint=false). Lightning would
        # number its optimiser states in module order; they are in optimiser order (PyTorch's layout).
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
        strict = self.lightning_module.strict_loading
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(self.model, checkpoint.pop("state_dict"), options=options)
        for optimizer, state in zip(self.optimizers, checkpoint.pop("optimizer_states", []), strict=True):
            named = named_optimizer_state(state, optimizer, self.model)
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named, options=options)
        return checkpoint

    def _load_shard_folder(self, path: Path) -> dict[str, Any]:
        # Lightning's own sharded load, with the safe reader: weights, then each optimiser's state,
        # then meta.pt (loops, schedulers, callbacks). A lean checkpoint holds the trained tensors only.
        present = {
            key.removeprefix("state_dict.")
            for key in read_metadata(path).state_dict_metadata
            if key.startswith("state_dict.")
        }
        module = self.lightning_module
        if isinstance(module, LeanCheckpoint):
            check_lean_keys(present, module.lean_keys(), f"{path}")
        weights = {k: v for k, v in get_model_state_dict(self.model).items() if k in present}
        state = {"state_dict": weights}
        load_into(state, path)
        self.model.load_state_dict(state["state_dict"], strict=module.strict_loading)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(self.model, optimizer)}
            load_into(optimizer_state, path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optimizer_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)

    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the sharded units compute in: ``param_dtype`` on GPU, the weights' own on CPU."""
        return None if self.root_device.type == "cpu" else self.param_dtype


def owned_modules(unit: nn.Module, units: list[nn.Module]) -> list[nn.Module]:
    """The modules whose parameters ``unit`` shards: its own subtree minus the other units' subtrees."""
    others = {id(u) for u in units if u is not unit}
    owned, pending = [], [unit]
    while pending:
        module = pending.pop()
        owned.append(module)
        pending.extend(child for child in module.children() if id(child) not in others)
    return owned


def unit_precision(
    owned: list[nn.Module], compute_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None
) -> MixedPrecisionPolicy:
    """The mixed-precision policy of a unit that owns the modules ``owned``.

    Low precision everywhere except two kinds of unit, which keep float32 weights and inputs:
    those holding BatchNorm (it needs float32 weights beside its float32 running statistics; their
    outputs go on in ``compute_dtype``) and those holding only scalars (a loss's temperature and
    bias: the loss is computed in float32).
    """
    if compute_dtype is None:
        return MixedPrecisionPolicy()
    params = [p for m in owned for p in m.parameters(recurse=False)]
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in owned):
        return MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=compute_dtype
        )
    if params and all(p.numel() == 1 for p in params):
        return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)


def positional_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """Optimiser state keyed by parameter name (torch.distributed.checkpoint's layout) -> PyTorch's
    own layout, parameters numbered in optimiser order (what ``Optimizer.load_state_dict`` takes)."""
    index: dict[str, int] = {}
    groups = [
        {**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]}
        for group in state["param_groups"]
    ]
    unknown = sorted(set(state["state"]) - set(index))
    if unknown:
        raise ValueError(f"optimizer state for parameters in no parameter group: {unknown[:3]}")
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def named_optimizer_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module
) -> dict[str, Any]:
    """The inverse of ``positional_optimizer_state`` for the live ``optimizer`` over ``module``."""
    name_of = {id(p): name for name, p in module.named_parameters()}
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    sizes = [len(group["params"]) for group in state["param_groups"]]
    if sum(sizes) != len(names) or len(sizes) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint optimizer state has parameter groups of sizes {sizes}, the optimizer "
            f"{[len(g['params']) for g in optimizer.param_groups]}"
        )
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def average_batchnorm_statistics(module: nn.Module) -> None:
    """Average the BatchNorm running statistics over the processes.

    FSDP leaves buffers to each process (DDP instead copies rank 0's before every forward), so
    statistics updated from each process's own batch would drift apart and checkpoints, exports
    and evaluation would depend on the rank. The average of the running means is what one process
    on the global batch computes (the running variances are close to it).
    """
    stats = [
        buffer
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buffer in (m.running_mean, m.running_var)
        if buffer is not None
    ]
    if not stats or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    flat = torch.cat([buffer.flatten() for buffer in stats])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for buffer, value in zip(stats, flat.split([b.numel() for b in stats]), strict=True):
        buffer.copy_(value.view_as(buffer))


def transformer_layers(module: nn.Module) -> list[nn.Module]:
    """The layers every Hugging Face model inside ``module`` declares unsplittable, outermost first."""
    names = {
        name
        for m in module.modules()
        if isinstance(m, PreTrainedModel)
        for name in (m._no_split_modules or [])
    }
    return [m for m in module.modules() if type(m).__name__ in names]


def encoder_stages(module: nn.Module) -> list[nn.Module]:
    """The shard units every volume encoder inside ``module`` declares."""
    return [unit for encoder in volume_encoders(module) for unit in encoder.shard_units()]


def components(stage: nn.Module) -> list[nn.Module]:
    """Units the stage code may call directly (not only through their parent's forward), inner first."""
    units: list[nn.Module] = volume_encoders(stage)
    for vlm in (m for m in stage.modules() if isinstance(m, VisionLanguageModel)):
        units += [vlm.vision_tower, vlm.projector]
    units += [child for child in stage.children() if any(True for _ in child.parameters())]
    return list(dict.fromkeys(units))  # a vision tower can be both an encoder and a VLM part


def shard_plan(stage: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(units to shard, bottom-up and ending with ``stage``; the subset to activation-checkpoint)."""
    layers = transformer_layers(stage) + encoder_stages(stage)
    units = list(dict.fromkeys([*layers, *components(stage), stage]))
    return units, layers


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def shard_stage(stage: L.LightningModule) -> None:
    """Apply FSDP2 to ``stage`` as ``shard_plan`` says when the trainer uses ``FSDP2Strategy``."""
    strategy = stage.trainer.strategy
    if not isinstance(strategy, FSDP2Strategy) or is_sharded(stage):
        return  # another strategy, or already sharded (configure_model runs again for test)
    on_gpu = strategy.root_device.type != "cpu"
    if strategy.sync_batchnorm:
        if not on_gpu:
            raise ValueError(
                "trainer.strategy.sync_batchnorm=true needs GPUs (SyncBatchNorm); on CPU "
                "freeze BatchNorm instead (e.g. stage.module.freeze_bn=true)"
            )
        nn.SyncBatchNorm.convert_sync_batchnorm(stage)
    units, layers = shard_plan(stage)
    if strategy.activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for layer in layers:
            checkpoint(layer)
    mesh = stage.device_mesh["data_parallel"]
    compute_dtype = strategy.compute_dtype()
    for unit in units:
        policy = unit_precision(owned_modules(unit, units), compute_dtype, strategy.reduce_dtype)
        # Components keep their gathered weights until the backward pass (as FSDP does for a root):
        # stage code reads some of them between forward and backward (SigLIP logs its temperature).
        reshard = strategy.reshard_after_forward and unit in layers
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    # Decide the root now: stage code calls components directly (validation embeds without the
    # stage's forward), and FSDP2 would otherwise make the first unit to run the root.
    stage._get_fsdp_state()._lazy_init()


class ShardedStage:
    """Mixin for the stage LightningModules (list it before ``LightningModule``): FSDP2 under
    ``trainer=fsdp``, nothing under other strategies."""

    def configure_model(self) -> None:
        shard_stage(self)


@contextmanager
def full_weights(module: nn.Module) -> Iterator[None]:
    """Inside, the sharded parameters of ``module`` are whole (float32 master weights, on the CPU) on
    global rank 0, so ``state_dict()`` and attribute access there see full tensors (for exports).

    Collective under FSDP: every rank must enter it; other ranks see their shards. A no-op when
    ``module`` is not sharded.
    """
    if not is_sharded(module):
        yield
        return
    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()  # registered parameters are the sharded ones from here on
    rank_zero = torch.distributed.get_rank() == 0
    full: dict[int, nn.Parameter] = {}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    # Same traversal on every rank, so the all-gathers pair up; a tied parameter is gathered once.
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if not isinstance(param, DTensor):
                continue
            if id(param) not in full:
                whole = param.detach().full_tensor().cpu()
                full[id(param)] = (
                    nn.Parameter(whole, requires_grad=param.requires_grad) if rank_zero else param
                )
            if rank_zero:
                swapped.append((owner, name, param))
                owner._parameters[name] = full[id(param)]
    try:
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def _checked_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a checkpoint folder (a sharded checkpoint is a directory)")
    if not (folder / _METADATA_FILENAME).is_file() or not (folder / ".metadata").is_file():
        raise ValueError(
            f"{folder}: not a sharded Lightning checkpoint (needs {_METADATA_FILENAME} and .metadata)"
        )
    check_checkpoint(folder)


def consolidate(folder: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint ``folder`` as the single file ``out`` (atomically); return ``out``."""
    folder, out = Path(folder), Path(out)
    _checked_folder(folder)
    try:
        checkpoint = load_whole(folder)
    except RefusedCheckpointData as error:
        raise CorruptCheckpoint(f"{folder}: refused: {error}") from error
    checkpoint.update(torch.load(folder / _METADATA_FILENAME, map_location="cpu", weights_only=True))
    optimizer_keys = sorted(
        (k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:])
    )
    checkpoint["optimizer_states"] = [positional_optimizer_state(checkpoint.pop(k)) for k in optimizer_keys]
    with atomic_path(out) as tmp:
        torch.save(checkpoint, tmp)
    return out


WEIGHTS_INDEX = "model.safetensors.index.json"


def consolidate_weights(folder: str | Path, out: str | Path, max_shard_size: str = "5GB") -> Path:
    """The trained weights of the sharded checkpoint ``folder`` as safetensors shards in the folder
    ``out`` (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, Hugging Face's
    layout; written atomically), read tensor by tensor from the shards: one tensor in memory at a time."""
    folder, out = Path(folder), Path(out)
    _checked_folder(folder)
    try:
        entries = read_metadata(folder).state_dict_metadata
    except RefusedCheckpointData as error:
        raise CorruptCheckpoint(f"{folder}: refused: {error}") from error
    prefix = "state_dict."
    tensors = {
        key[len(prefix) :]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype, device="meta")
        for key, entry in entries.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not tensors:
        raise ValueError(f"{folder}: holds no model weights (no state_dict.* tensors)")

    def pieces(name: str) -> Iterator[torch.Tensor]:
        tensor = torch.empty(tensors[name].shape, dtype=tensors[name].dtype)
        with warnings.catch_warnings():  # one process reading, as intended: torch says so at every read
            warnings.filterwarnings(
                "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
            )
            load_into({prefix + name: tensor}, folder)
        yield tensor

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    with atomic_folder(out, (WEIGHTS_INDEX, "model.safetensors")) as staging:
        for file, names in split.filename_to_tensors.items():
            write_safetensors(
                staging / file, {name: (tensors[name].dtype, tensors[name].shape) for name in names}, pieces
            )
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (staging / WEIGHTS_INDEX).write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
    return out
