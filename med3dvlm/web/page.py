"""The Gradio page of ``python -m med3dvlm.app``: choose a model, upload a scan (or pick a prepared
volume), look at it as read and as the model receives it, ask.

Served by :func:`serve` on 127.0.0.1 unless told otherwise, with no share link, no analytics and
no web fonts fetched. An upload, and the views cut from it, stay in the app's own folder
(:mod:`~med3dvlm.web.uploads`: removed however the app stops; files older than an hour are removed
while it runs) and its arrays in the session's memory (dropped with the session). Answers queue: one
is generated at a time.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import numpy as np

from med3dvlm.data.preprocess import WINDOWS
from med3dvlm.data.prompts import caption_question
from med3dvlm.models.generation import GenerationSettings
from med3dvlm.web.session import (
    UPLOAD_SUFFIXES,
    VIEWS,
    Limits,
    Models,
    Scan,
    UploadError,
    prompt_for,
    question_text,
    raw_display_range,
    read_upload,
    shown_prompt,
    stream_answer,
    view,
    view_labels,
)

DISPLAY_PIXELS = 256
"""Views are enlarged (nearest neighbour) to at least this many pixels on their longer side."""
SESSION_SECONDS = 3600


def _enlarged(image: np.ndarray) -> np.ndarray:
    factor = max(1, DISPLAY_PIXELS // max(image.shape))
    return np.kron(image, np.ones((factor, factor), dtype=image.dtype)) if factor > 1 else image


def _views(scan: Scan | None, positions: tuple[float, float, float]) -> list[np.ndarray | None]:
    if scan is None:
        return [None] * 6
    order = scan.recipe.orientation
    raw = [
        _enlarged(view(scan.raw, kind, p, raw_display_range(scan), order, scan.raw_spacing))
        for kind, p in zip(VIEWS, positions, strict=True)
    ]
    seen = [
        _enlarged(view(scan.volume, kind, p, (0.0, 1.0), order, scan.spacing))
        for kind, p in zip(VIEWS, positions, strict=True)
    ]
    return raw + seen


def _view_title(kind: str, where: str, orientation: str | None) -> str:
    top, left = view_labels(kind, orientation)
    return f"{kind}, {where} (top {top}, left {left})"


def _describe(scan: Scan) -> str:
    note = ""
    if scan.hu_unwindowed:
        note = " **Raw CT in Hounsfield units, min-max normalised: choose the window the model was trained with.**"
    elif scan.unlike_ct:
        note = (
            " **⚠ This scan does not look like CT in Hounsfield units (no air near -1000 HU): a CT window "
            "maps it to intensities unlike the model's training data. For an MRI choose window none.**"
        )
    order = scan.recipe.orientation or "as stored"
    return (
        f"`{scan.name}`: {'×'.join(map(str, scan.raw.shape))} as read (D×H×W, voxel order {order}), "
        f"{'×'.join(map(str, scan.volume.shape))} for the model, window {scan.window}.{note}"
    )


def _volumes(folder: Path | None) -> list[str]:
    if folder is None:
        return []
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name.lower().endswith((".npy", ".nii.gz", ".nii"))
    )


def build(
    models: Models,
    limits: Limits | None = None,
    volumes_dir: str | os.PathLike | None = None,
    window: str = "model",
    source: str | None = None,
) -> gr.Blocks:
    """The page (not yet served). ``window``: ``model`` (the window of the model's training data, its
    record), or another to try (a warning is logged); ``source``: which of the model's sources."""
    limits = limits or Limits()
    volumes = Path(volumes_dir) if volumes_dir is not None else None

    def load(model_name: str, upload: str | None, picked: str | None, window_name: str, *positions: float):
        scan_path = upload or (str(volumes / picked) if volumes is not None and picked else None)
        if scan_path is None:
            return None, "Upload a scan or pick a prepared volume.", *_views(None, positions)
        try:
            recipe = models.recipe(model_name, window_name, source)
            scan = read_upload(scan_path, models.loaded(model_name).record.input_size, recipe, limits)
        except (UploadError, ValueError) as err:
            return None, f"⚠ {err}", *_views(None, positions)
        return scan, _describe(scan), *_views(scan, positions)

    def ask(
        model_name: str,
        scan: Scan | None,
        kind: str,
        question: str,
        a: str,
        b: str,
        c: str,
        d: str,
        max_new_tokens: int,
        do_sample: bool,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
    ) -> Iterator[tuple[str, str, str]]:
        if scan is None:
            yield "", "", "⚠ Upload a scan first."
            return
        try:
            text = question_text(kind, question, (a, b, c, d))
        except UploadError as err:
            yield "", "", f"⚠ {err}"
            return
        loaded = models.loaded(model_name)
        model = loaded.model
        prompt = prompt_for(model, kind, text, loaded.record.prompt_format)
        settings = GenerationSettings(
            int(max_new_tokens), bool(do_sample), float(temperature), float(top_p), float(repetition_penalty)
        )
        shown = shown_prompt(model, prompt)
        yield "", shown, "Generating…"
        answer = ""
        for answer in stream_answer(model, models.lock(model_name), scan.volume, prompt, settings):
            yield answer, shown, "Generating…"
        yield answer, shown, "Done."

    with gr.Blocks(analytics_enabled=False, title="med3dvlm", delete_cache=(600, SESSION_SECONDS)) as page:
        gr.Markdown("## med3dvlm: one scan\nUpload a scan, look at what the model receives, ask.")
        scan_state = gr.State(None, time_to_live=SESSION_SECONDS)
        with gr.Row():
            model = gr.Dropdown(models.names(), value=models.names()[0], label="model")
            window_box = gr.Dropdown(
                ["model", "none", *WINDOWS],
                value=window,
                label="CT window (model = its training data's; none = min-max)",
            )
        with gr.Row():
            upload = gr.File(
                label="scan: NIfTI, NRRD, MetaImage, a DICOM series as .zip, or a prepared .npy",
                file_types=list(UPLOAD_SUFFIXES),
                type="filepath",
                elem_id="upload",
            )
            picked = gr.Dropdown(
                _volumes(volumes), value=None, label="or a prepared volume", visible=volumes is not None
            )
        status = gr.Markdown(elem_id="status")
        sliders = [gr.Slider(0.0, 1.0, value=0.5, step=0.01, label=f"{kind} position") for kind in VIEWS]
        order = models.recipe(models.names()[0], "model", source).orientation
        with gr.Row():
            raw_views = [
                gr.Image(label=_view_title(kind, "as read", order), type="numpy", interactive=False)
                for kind in VIEWS
            ]
        with gr.Row():
            model_views = [
                gr.Image(
                    label=_view_title(kind, "as the model receives it", order),
                    type="numpy",
                    interactive=False,
                )
                for kind in VIEWS
            ]
        kind = gr.Radio(
            [("Question", "question"), ("Closed question (A–D)", "closed"), ("Report", "report")],
            value="question",
            label="ask",
        )
        question = gr.Textbox(caption_question(), label="question (free or closed)", elem_id="question")
        with gr.Row():
            choices = [gr.Textbox(label=letter) for letter in "ABCD"]
        with gr.Accordion("advanced", open=False):
            max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="max new tokens")
            do_sample = gr.Checkbox(False, label="sample (off: greedy, as the benchmark)")
            temperature = gr.Slider(0.05, 2.0, value=1.0, label="temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, label="top p")
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, label="repetition penalty")
        go = gr.Button("Ask", variant="primary", elem_id="ask")
        progress = gr.Markdown(elem_id="progress")
        answer = gr.Textbox(label="answer", lines=6, interactive=False, elem_id="answer")
        with gr.Accordion("prompt sent", open=False):
            prompt = gr.Textbox(
                label="prompt (the image block as a count)", interactive=False, elem_id="prompt"
            )

        loaded = [scan_state, status, *raw_views, *model_views]
        inputs = [model, upload, picked, window_box, *sliders]
        for trigger in (upload.change, picked.change, window_box.change, model.change):
            trigger(load, inputs, loaded)
        for slider in sliders:
            slider.release(lambda s, *p: _views(s, p), [scan_state, *sliders], [*raw_views, *model_views])
        go.click(
            ask,
            [
                model,
                scan_state,
                kind,
                question,
                *choices,
                max_new_tokens,
                do_sample,
                temperature,
                top_p,
                repetition_penalty,
            ],
            [answer, prompt, progress],
            concurrency_limit=1,
            concurrency_id="answer",
        )
    return page


def serve(
    page: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: int = 1024, block: bool = True
) -> gr.Blocks:
    """Serve ``page`` (no share link, no web fonts); ``block=False`` returns once it listens."""
    theme = gr.themes.Default(
        font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "monospace")
    )
    page.queue(default_concurrency_limit=4, max_size=32)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        max_file_size=f"{max_upload_mb}mb",
        theme=theme,
        ssr_mode=False,
        show_error=True,
        quiet=True,
        prevent_thread_lock=not block,
        mcp_server=False,
    )
    return page
