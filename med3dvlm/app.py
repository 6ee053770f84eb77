"""``python -m med3dvlm.app model=PATH | models_dir=DIR``: a local web page for one scan (upload,
look, ask). See :mod:`med3dvlm.web.page` for what it serves and what it keeps of an upload."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import hydra
from omegaconf import DictConfig

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)


def missing_extra() -> str | None:
    """What to install when the page's library is missing (checked before anything loads)."""
    if importlib.util.find_spec("gradio") is None:
        return "the web page needs Gradio, the optional `app` extra: pip install -e '.[app]' in a checkout"
    return None


@hydra.main(config_path="configs", config_name="app", version_base="1.3")
def main(cfg: DictConfig) -> None:
    needed = missing_extra()
    if needed:
        raise SystemExit(f"python -m med3dvlm.app: {needed}")
    with tempfile.TemporaryDirectory(prefix="med3dvlm-app-") as uploads:
        os.environ["GRADIO_TEMP_DIR"] = uploads  # uploads land here, removed when the app stops
        from med3dvlm.web.page import build, serve
        from med3dvlm.web.session import Limits, Models

        dtype = (
            cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cfg.device.startswith("cuda") else "float32")
        )
        models = Models(cfg.model, cfg.models_dir, cfg.device, dtype, cfg.verify_files)
        page = build(
            models, Limits(max_voxels=cfg.max_voxels), cfg.volumes_dir, cfg.intensity.window, cfg.source
        )
        print(f"med3dvlm app: http://{cfg.host}:{cfg.port} (models: {', '.join(models.names())})", flush=True)
        serve(page, cfg.host, cfg.port, cfg.max_upload_mb)


if __name__ == "__main__":
    main()
