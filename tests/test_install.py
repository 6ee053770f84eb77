"""The package as a user installs it: a wheel (not the checkout) runs the commands from an empty
directory, with the configs it ships and outputs under the current directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_a_wheel_runs_the_demo_siglip_stage_from_an_empty_directory(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "PYTHONPATH": "",
    }
    env.pop("MED3DVLM_ROOT", None)
    # Built from the sources git sees (tracked, or new and not ignored): an in-tree build would reuse
    # the checkout's build/ folder, where a module deleted from the sources would still be packed.
    source = tmp_path / "source"
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file() and not (REPO / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(source)],
        source,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("med3dvlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "med3dvlm/configs/train.yaml" in names and "med3dvlm/configs/experiment/demo.yaml" in names
    # A fresh environment that sees this one's dependencies but not the checkout: a .pth line adds
    # their folder, whose own .pth files (the editable install of the checkout) are not run.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        tmp_path,
        env,
    )
    work = tmp_path / "empty"
    work.mkdir()
    located = subprocess.run(
        [str(python), "-c", "import med3dvlm; print(med3dvlm.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert located.startswith(site)  # the installed wheel, not the checkout
    bin_dir = venv / "bin"
    run(
        [str(bin_dir / "med3dvlm-synthetic"), "out=data/demo/raw", "cases=24", "slices=8", "size=32"],
        work,
        env,
    )
    run(
        [
            str(bin_dir / "med3dvlm-prepare"),
            "source=data/demo/raw",
            "out=data/demo/prepared",
            "spatial_size=[32,64,64]",
            "format=npy",
            "progress=false",
        ],
        work,
        env,
    )
    run(
        [
            str(bin_dir / "med3dvlm-train"),
            "experiment=demo",
            "stage=siglip",
            "trainer.max_steps=3",
            "test=false",
            "trainer.enable_progress_bar=false",
        ],
        work,
        env,
    )
    exports = list((work / "outputs" / "siglip").glob("*/*/export/record.json"))
    assert len(exports) == 1  # outputs under the current directory
    assert (work / "data" / "assets" / "tiny_bert").is_dir()
