"""The benchmark's measuring tools: interleaved pairs and their ratio, the table's original columns
only when the original ran here, the peak-memory probe, loading the original's files, and the import
section on a tiny release."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config

from med3dvlm import benchmarks
from med3dvlm.artifacts.model_folder import load_pretrained
from med3dvlm.artifacts.released import read_checkpoint
from med3dvlm.benchmarks import BenchRow, bench_table, paired_seconds
from med3dvlm.benchmarks.original import load_original
from med3dvlm.benchmarks.peak_memory import step_peak_mib
from med3dvlm.benchmarks.release_import import ReleaseShape, measure_import


def test_pairs_are_interleaved_and_the_ratio_is_the_median_of_pairs(monkeypatch):
    clock = [0.0]
    calls = []
    monkeypatch.setattr(benchmarks.time, "perf_counter", lambda: clock[0])
    durations = iter([4.0, 1.0, 4.0, 3.0, 2.0, 2.0, 10.0, 1.0])  # warm-up pair, then three timed pairs

    def timed(name):
        def run():
            calls.append(name)
            clock[0] += next(durations)

        return run

    original, ours, ratio = paired_seconds(timed("original"), timed("ours"), repeats=3, warmup=1)
    assert calls == ["original", "ours"] * 4
    assert (original, ours) == (4.0, 2.0)
    assert ratio == 0.75  # pairs 3/4, 2/2, 1/10: the median of the ratios, not 2/4


def test_the_table_has_original_columns_only_when_the_original_ran():
    alone = bench_table([BenchRow("encoder", "forward", 0.06, "s", "2 threads")])
    assert "original" not in alone
    assert alone.splitlines()[2] == "| encoder | forward | 0.06 | s | 2 threads |"
    beside = bench_table(
        [
            BenchRow("encoder", "forward", 0.06, "s", "pairs", original=0.12, ratio=0.5),
            BenchRow("encoder", "coverage", 15.6, "%"),
        ]
    )
    assert "| original | ours / original |" in beside
    assert "| encoder | forward | 0.06 | s | 0.12 | 0.50 | pairs |" in beside
    assert "| encoder | coverage | 15.6 | % |  |  |  |" in beside


def test_peak_memory_sees_a_transient_tensor():
    def step():
        big = torch.ones(25 * 2**20)  # 100 MiB, freed before the step returns
        (big * 2).sum()

    peak = step_peak_mib(step)
    if peak is None:
        pytest.skip("no mallinfo2 here")
    assert 190 <= peak <= 230  # the tensor and its doubled copy
    assert step_peak_mib(lambda: torch.ones(4).sum()) < 5


def _checkout(root, encoder_source: str):
    (root / "src/model/encoder").mkdir(parents=True)
    (root / "src/model/projector").mkdir(parents=True)
    (root / "src/model/encoder/dcformer.py").write_text(encoder_source)
    (root / "src/model/projector/mlp.py").write_text("class MixerLowHighHybridMLP:\n    pass\n")
    return root


def test_the_original_loads_with_a_timm_stand_in(tmp_path):
    if "timm" in sys.modules or importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed: the stand-in is not used")
    source = (
        "from timm.layers import DropPath, to_3tuple\n"
        "def decomp_small(input_size=(1, 1, 1)):\n    return DropPath(0.0), to_3tuple(2)\n"
    )
    try:
        original = load_original(_checkout(tmp_path, source))
        drop, triple = original.decomp_small()
    finally:
        sys.modules.pop("timm", None), sys.modules.pop("timm.layers", None)
    assert isinstance(drop, torch.nn.Identity) and triple == (2, 2, 2)
    assert original.mixer.__name__ == "MixerLowHighHybridMLP"


def test_a_folder_that_is_not_the_original_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="src/model/encoder/dcformer.py not found"):
        load_original(tmp_path)


def test_a_missing_dependency_of_the_original_is_named(tmp_path):
    checkout = _checkout(tmp_path, "import not_installed_anywhere\n")
    with pytest.raises(ModuleNotFoundError, match="pip install not_installed_anywhere"):
        load_original(checkout)


def test_the_import_section_measures_a_tiny_release(tmp_path):
    llm = Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    shape = ReleaseShape(llm, "dcformer_nano", (64, 128, 128), (24, 16), (8, 16), shard_size="100KB")
    rows = {row.name.split(": ")[-1]: row for row in measure_import(shape, tmp_path)}
    assert rows["peak resident memory"].unit == "GiB" and 0.1 < rows["peak resident memory"].value < 8
    assert rows["wall time"].value > 0 and rows["release read"].value > 0
    assert "2 decoder layers" in rows["peak resident memory"].note
    # The release is sharded as Hugging Face shards, and its import holds its values as float32.
    assert (tmp_path / "release" / "model.safetensors.index.json").is_file()
    release = read_checkpoint(tmp_path / "release")
    model = load_pretrained(tmp_path / "imported").model
    assert torch.equal(model.llm.lm_head.weight, release["lm_head.weight"].float())
    assert torch.equal(
        model.projector.high[1].channel_norm.bias, release["model.mm_projector.high_mixer.1.ln2.bias"].float()
    )
    assert load_file(str(tmp_path / "imported" / "llm" / "model.safetensors"))["model.norm.weight"].dtype == (
        torch.float32
    )
