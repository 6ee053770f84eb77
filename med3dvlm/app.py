"""``python -m med3dvlm.app model=PATH | models_dir=DIR``: a local web page for one scan (upload,
look, ask). See :mod:`med3dvlm.web.page` for what it serves, and :mod:`med3dvlm.web.uploads` for
where an upload is kept and when it is removed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import DictConfig

import med3dvlm.resolvers  # noqa: F401  (registers the resolvers)
from med3dvlm.utils.command import hydra_command
from med3dvlm.web.session import Limits, Models
from med3dvlm.web.uploads import private_folder


def missing_extra() -> str | None:
    """What to install when the page's library is missing (checked before anything loads)."""
    if importlib.util.find_spec("gradio") is None:
        return "the web page needs Gradio, the optional `app` extra: pip install -e '.[app]' in a checkout"
    return None


@hydra_command("app")
def main(cfg: DictConfig) -> None:
    needed = missing_extra()
    if needed:
        raise SystemExit(f"python -m med3dvlm.app: {needed}")
    if cfg.volumes_dir is not None and not Path(cfg.volumes_dir).is_dir():
        raise NotADirectoryError(f"volumes_dir={cfg.volumes_dir}: not a folder")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    models = Models(cfg.model, cfg.models_dir, cfg.device, dtype, cfg.verify_files)  # checked, not loaded
    with private_folder():
        from med3dvlm.web.page import build, serve  # Gradio reads where its cache goes when imported

        page = build(
            models, Limits(max_voxels=cfg.max_voxels), cfg.volumes_dir, cfg.intensity.window, cfg.source
        )
        print(f"med3dvlm app: http://{cfg.host}:{cfg.port} (models: {', '.join(models.names())})", flush=True)
        try:
            serve(page, cfg.host, cfg.port, cfg.max_upload_mb)
        finally:
            page.close()  # no upload arrives while the folder is removed


if __name__ == "__main__":
    main()
