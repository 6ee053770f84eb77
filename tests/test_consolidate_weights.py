"""``consolidate --weights``: a sharded checkpoint's trained weights as safetensors shards, read one
tensor at a time (never the whole checkpoint in memory)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.load import _METADATA_FILENAME
from safetensors.torch import load_file

from med3dvlm import consolidate as command
from med3dvlm.training import shard_reader, sharding


@pytest.fixture
def checkpoint(tmp_path):
    """A shard folder as trainer=fsdp writes one: tensors under state_dict.*, an optimizer entry, meta.pt."""
    generator = torch.Generator().manual_seed(0)
    weights = {
        "encoder.stem.weight": torch.randn(64, 1, 3, 3, 3, generator=generator),
        "encoder.stem.bias": torch.randn(64, generator=generator),
        "projector.low.weight": torch.randn(128, 96, generator=generator).to(torch.bfloat16),
        "llm.embed_tokens.weight": torch.randn(300, 32, generator=generator),
    }
    folder = tmp_path / "last.ckpt"
    state = {
        "state_dict": {k: v.clone() for k, v in weights.items()},
        "optimizer_0": {"step": torch.tensor(3.0)},
    }
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save({"epoch": 0, "global_step": 3}, folder / _METADATA_FILENAME)
    return folder, weights


def test_the_weights_come_out_equal_in_shards_one_tensor_read_at_a_time(checkpoint, tmp_path, monkeypatch):
    folder, weights = checkpoint
    reads: list[list[str]] = []
    real_load_into = shard_reader.load_into

    def counting_load_into(state, source):
        reads.append(list(state))
        real_load_into(state, source)

    monkeypatch.setattr(sharding, "load_into", counting_load_into)
    monkeypatch.setattr(sharding, "load_whole", lambda *_: pytest.fail("the whole checkpoint was loaded"))
    out = sharding.consolidate_weights(folder, tmp_path / "weights", max_shard_size="40KB")

    index = json.loads((out / sharding.WEIGHTS_INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == files
    loaded = {k: v for name in files for k, v in load_file(out / name).items()}
    assert loaded.keys() == weights.keys()
    for key, tensor in weights.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    assert sorted(reads) == sorted([[f"state_dict.{key}"] for key in weights])  # one tensor per read


def test_the_command_writes_weights_or_refuses_both_outputs(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint
    command.main([str(folder), "--weights", str(tmp_path / "w")])
    assert (
        "weights written to" in capsys.readouterr().out
        and (tmp_path / "w" / sharding.WEIGHTS_INDEX).is_file()
    )
    with pytest.raises(SystemExit):
        command.main([str(folder), "--weights", str(tmp_path / "w"), "--out", str(tmp_path / "x.ckpt")])
