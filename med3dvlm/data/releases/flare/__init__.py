"""FLARE 2025 Task 5 (``dataset=flare``): AMOS-MM abdominal and CT-RATE chest CT with region-structured
reports and question chains, as ``FLARE-Task5-MLLM-3D`` lays them out (:mod:`.layout`), prepared as
Med3DVLM's FLARE recipe prepares them (:mod:`.recipe`), planned by :mod:`.plan`; :mod:`.synthetic`
writes a miniature of the same layout."""

from med3dvlm.data.releases.base import DatasetLicence, Release
from med3dvlm.data.releases.flare.plan import finish, plan_flare, preprocessing
from med3dvlm.data.releases.flare.samples import FlareReportDataset, FlareVQADataset, corpus_texts
from med3dvlm.data.releases.flare.synthetic import generate

RELEASE = Release(
    name="flare",
    summary="FLARE-Task5-MLLM-3D (train/CT-AMOS-1290, train/CT-RATE-2000, validation/images and their JSONs)",
    preprocessing=preprocessing,
    plan=plan_flare,
    finish=finish,
    caption_file="FLARE.json",
    prompt_format="flare",
    corpus=corpus_texts,
    tasks={"flare_report": FlareReportDataset, "flare_vqa": FlareVQADataset},
    mixtures={
        "retrieval": ("retrieval",),
        "pretrain": ("flare_report", "flare_vqa"),
        "finetune": ("flare_report", "flare_vqa"),
    },
    synthetic=generate,
    licence=DatasetLicence(
        "cc-by-nc-4.0",
        ("FLARE-MedFM/FLARE-Task5-MLLM-3D",),
        "FLARE 2025 Task 5: CC BY-NC 4.0 as the FLARE26 card states (the 2025 card's terms not seen); "
        "its chest CT comes from CT-RATE (CC BY-NC-SA 4.0)",
    ),
)
