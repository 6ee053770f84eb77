"""The web app: its functions without a browser (uploads, limits, views, prompts, streaming, one
answer at a time), the served app's folder of uploads (gone however the app stops), and the page in a
real headless Chromium (upload a NIfTI, ask, read the answer)."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.commands import OFFLINE, free_port, run_in_process
from helpers.vlm import INPUT_SIZE
from helpers.vlm import finetuned as finetune_handoff
from test_scans import ct_volume, write_dicom_series, write_nifti

from med3dvlm.artifacts.model_folder import is_model_folder, write_merged_model
from med3dvlm.data.preprocess import SourcePreprocessing
from med3dvlm.models.generation import GenerationSettings, answer
from med3dvlm.web.session import (
    Limits,
    Models,
    UploadError,
    prompt_for,
    question_text,
    read_upload,
    shown_prompt,
    stream_answer,
    view,
    view_labels,
)
from med3dvlm.web.uploads import private_folder, remove_leftovers

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "app.png"
SOFT = SourcePreprocessing(window="soft_tissue", scale="window", orientation="RAS")
BARE = SourcePreprocessing(orientation="RAS")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    _, handoff, _ = finetune_handoff(root)
    folders = root / "models"
    write_merged_model(handoff, folders / "demo")
    (folders / "not-a-model").mkdir()
    return folders


@pytest.fixture(scope="module")
def models(models_dir):
    return Models(models_dir=models_dir)


def test_the_app_without_its_extra_says_what_to_install_before_loading_anything(monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gradio" else object())
    with pytest.raises(
        SystemExit, match=r"needs Gradio, the optional `app` extra: pip install -e '.\[app\]'"
    ):
        run_in_process(monkeypatch, "app", "model=/nonexistent")


def test_models_dir_offers_only_model_folders(models, models_dir):
    assert models.names() == ["demo"]
    assert is_model_folder(models_dir / "demo") and not is_model_folder(models_dir / "not-a-model")
    with pytest.raises(FileNotFoundError, match="no model folder found"):
        Models(models_dir=models_dir / "not-a-model")


def test_a_scan_is_prepared_as_prepare_does_and_a_window_is_applied(tmp_path):
    scan = read_upload(write_nifti(tmp_path / "ct.nii.gz", ct_volume()), INPUT_SIZE, SOFT)
    assert scan.volume.shape == INPUT_SIZE and scan.raw.shape == (10, 12, 14)  # (x, y, z) -> (D, H, W)
    assert 0.0 <= scan.volume.min() and scan.volume.max() <= 1.0 and not scan.hu_unwindowed
    assert scan.raw_spacing == pytest.approx((2.5, 0.8, 0.7)) and scan.window == "[-160, 240] HU"
    bare = read_upload(tmp_path / "ct.nii.gz", INPUT_SIZE, BARE)
    assert bare.hu_unwindowed and not np.allclose(bare.volume, scan.volume)


def test_a_zipped_dicom_series_reads_like_its_folder(tmp_path):
    series = write_dicom_series(tmp_path / "series", ct_volume())
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in series.iterdir():
            zf.write(file, f"CT/{file.name}")
    from_zip = read_upload(archive, INPUT_SIZE, SOFT)
    from_folder = read_upload(series, INPUT_SIZE, SOFT)
    assert np.array_equal(from_zip.volume, from_folder.volume)


@pytest.mark.parametrize(
    ("member", "message"), [("../evil.dcm", "leaves the archive"), ("a.dcm", "more than 0 MiB")]
)
def test_a_hostile_zip_is_refused(tmp_path, member, message):
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, b"\0" * 4096)
    with pytest.raises(UploadError, match=message):
        read_upload(archive, INPUT_SIZE, BARE, Limits(max_zip_bytes=1024 if member == "a.dcm" else 1 << 20))


def test_bad_uploads_get_a_message(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UploadError, match="notes.txt: not a supported upload"):
        read_upload(tmp_path / "notes.txt", INPUT_SIZE, BARE)
    write_nifti(tmp_path / "big.nii.gz", ct_volume())
    with pytest.raises(UploadError, match="voxels"):
        read_upload(tmp_path / "big.nii.gz", INPUT_SIZE, BARE, limits=Limits(max_voxels=100))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(UploadError, match="broken.nii.gz"):
        read_upload(tmp_path / "broken.nii.gz", INPUT_SIZE, BARE)


def test_views_cut_each_axis_and_show_the_radiological_display_of_any_voxel_order():
    volume = np.zeros((4, 6, 8), dtype=np.float32)
    volume[3] = 1.0  # the last axial slice
    assert view(volume, "axial", 1.0).shape == (6, 8) and view(volume, "axial", 1.0).min() == 255
    ras, lpi = (
        view(volume, "coronal", 0.5, orientation="RAS"),
        view(volume, "coronal", 0.5, orientation="LPI"),
    )
    assert (
        ras.shape == (4, 8) and (ras[0] == 255).all() and (ras[1:] == 0).all()
    )  # RAS: the last slice is superior
    assert (lpi[-1] == 255).all() and (lpi[:-1] == 0).all()  # LPI (M3D): the last slice is inferior
    assert view(volume, "sagittal", 0.0).shape == (4, 6)
    marked = np.zeros((4, 6, 8), dtype=np.float32)
    marked[:, 0, 0] = 1.0  # H index 0, W index 0: in RAS the posterior, patient's left corner
    axial = view(marked, "axial", 0.5, orientation="RAS")
    assert axial[-1, -1] == 255 and view_labels("axial", "RAS") == ("A", "R")  # bottom right: posterior, left
    assert view(marked, "axial", 0.5, orientation="LPI")[0, 0] == 255  # in LPI the anterior, patient's right
    assert view_labels("sagittal", None) == ("?", "?")
    # true aspect: 2.5 mm slices against 0.8 mm pixels stretch the coronal view 3x vertically
    assert view(volume, "coronal", 0.5, orientation="RAS", spacing=(2.4, 0.8, 0.8)).shape == (12, 8)


def test_prompts_follow_the_benchmark(models):
    model = models.get("demo")
    closed = question_text("closed", "Which organ?", ("Liver", "Spleen", "Kidney", "Lung"))
    assert closed == "Which organ? Choices: A. Liver B. Spleen C. Kidney D. Lung"
    prompt = prompt_for(model, "closed", closed)
    assert prompt == model.image_token * model.num_image_tokens + " " + closed
    assert shown_prompt(model, prompt) == f"{model.image_token} × {model.num_image_tokens} {closed}"
    report = prompt_for(model, "report", question_text("report"))
    assert report.startswith(model.image_token * model.num_image_tokens + "Can you provide a caption")
    with pytest.raises(UploadError, match="four choices"):
        question_text("closed", "Which organ?", ("Liver", "", "", ""))


def test_the_answer_streams_and_one_request_runs_at_a_time(models, tmp_path):
    model, lock = models.get("demo"), models.lock("demo")
    scan = read_upload(write_nifti(tmp_path / "ct.nii.gz", ct_volume()), INPUT_SIZE, SOFT)
    prompt = prompt_for(model, "question", "Is there a large lesion in the liver?")
    whole = answer(model, scan.volume, prompt, GenerationSettings(max_new_tokens=6))
    pieces = list(stream_answer(model, lock, scan.volume, prompt, GenerationSettings(max_new_tokens=6)))
    assert pieces and pieces[-1] == whole  # greedy: the streamed answer is infer's answer
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(pieces))
    with lock:  # another request holds the model: this one waits
        waiting = threading.Thread(
            target=lambda: list(
                stream_answer(model, lock, scan.volume, prompt, GenerationSettings(max_new_tokens=2))
            )
        )
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()
    waiting.join(timeout=30)
    assert not waiting.is_alive()


def test_the_private_folder_holds_the_temporary_files_and_goes_at_the_end(tmp_path):
    with private_folder(tmp_path) as folder:
        assert tempfile.gettempdir() == os.environ["GRADIO_TEMP_DIR"] == str(folder)
        with tempfile.NamedTemporaryFile(delete=False) as derived:
            assert Path(derived.name).parent == folder
        (folder / "ct.nii.gz").write_bytes(b"scan")
        assert remove_leftovers(tmp_path) == []  # in use: another app starting leaves it alone
    assert not folder.exists() and tempfile.gettempdir() != str(folder)


@pytest.fixture
def serve(models_dir):
    """Start ``python -m med3dvlm.app`` on the demo model with a given folder as its system's temporary
    folder; return it and its address once it answers. Whatever the test does, none outlives it."""
    started: list[subprocess.Popen] = []

    def start(temporary: Path, sigint_ignored: bool = False) -> tuple[subprocess.Popen, str]:
        port = free_port()
        command = [sys.executable, "-m", "med3dvlm.app", f"model={models_dir / 'demo'}", f"port={port}"]
        if sigint_ignored:  # as a shell starts a background job: SIGINT ignored, kept across exec
            command = ["sh", "-c", 'trap "" INT; exec "$0" "$@"', *command]
        app = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **OFFLINE, "TMPDIR": str(temporary)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        started.append(app)
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 300
        while True:
            try:
                httpx.get(url, timeout=2).raise_for_status()
                return app, url
            except httpx.HTTPError:
                if app.poll() is not None or time.monotonic() > deadline:
                    app.kill()
                    pytest.fail(f"the app did not serve: {app.communicate()[0][-3000:]}")
                time.sleep(1)

    yield start
    for app in started:
        if app.poll() is None:
            app.kill()
            app.wait()


def _look_at_a_scan(url: str, scan: Path, temporary: Path) -> Path:
    """Upload ``scan`` and show its views, as the page does; return the app's folder, which holds both."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False, download_files=False)
    status = client.predict("demo", handle_file(str(scan)), None, "model", 0.5, 0.5, 0.5, api_name="/load")[0]
    client.close()
    assert scan.name in status
    (folder,) = temporary.glob("med3dvlm-app-*")
    assert {"ct.nii.gz", "image.webp"} <= {p.name for p in folder.rglob("*")}  # the upload, views of it
    return folder


def _stop(app: subprocess.Popen, how: signal.Signals) -> None:
    app.send_signal(how)
    app.wait(timeout=60)


def test_sigterm_removes_the_uploads_and_a_start_those_of_a_killed_app(serve, tmp_path):
    scan, temporary = write_nifti(tmp_path / "ct.nii.gz", ct_volume()), tmp_path / "tmp"
    temporary.mkdir()
    killed, url = serve(temporary)
    left = _look_at_a_scan(url, scan, temporary)
    _stop(killed, signal.SIGKILL)  # no clean-up can run
    assert left.is_dir()
    app, url = serve(temporary)
    assert not left.exists()
    folder = _look_at_a_scan(url, scan, temporary)
    _stop(app, signal.SIGTERM)
    assert app.returncode == 128 + signal.SIGTERM and not folder.exists()


def test_ctrl_c_removes_the_uploads_even_when_the_launching_shell_ignores_it(serve, tmp_path):
    """A script's background job (`python -m med3dvlm.app &`) starts with SIGINT ignored; Ctrl-C, or
    `kill -INT`, still ends the app through its clean-up, without waiting on the page's connections."""
    scan, temporary = write_nifti(tmp_path / "ct.nii.gz", ct_volume()), tmp_path / "tmp"
    temporary.mkdir()
    app, url = serve(temporary, sigint_ignored=True)
    folder = _look_at_a_scan(url, scan, temporary)
    _stop(app, signal.SIGINT)
    assert app.returncode == 128 + signal.SIGINT and not folder.exists()


@pytest.mark.slow
def test_the_page_answers_in_a_headless_browser(models, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver (make test installs them as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path / "uploads")
    from med3dvlm.web.page import build, serve

    port = free_port()
    page = serve(build(models), port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 120)
        upload = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
        upload.send_keys(str(write_nifti(tmp_path / "ct.nii.gz", ct_volume())))
        wait.until(ready.text_to_be_present_in_element((By.ID, "status"), "ct.nii.gz"))
        question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
        question.clear()
        question.send_keys("Is there a large lesion in the liver?")
        browser.find_element(By.ID, "ask").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "progress"), "Done."))
        shown = browser.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        assert shown.strip()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("MED3DVLM_SCREENSHOT"):
            shutil.copy(tmp_path / "app.png", SCREENSHOT)
    finally:
        browser.quit()
        page.close()
