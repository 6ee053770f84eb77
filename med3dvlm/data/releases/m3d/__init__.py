"""M3D (``dataset=m3d``, the default): M3D-Cap's JPEG series and reports with M3D-VQA's CSVs, as the
release lays them out (:mod:`.layout`), planned by :mod:`.plan`; :mod:`.synthetic` writes a
miniature of the same layout."""

from med3dvlm.data.datasets import CaptionDataset
from med3dvlm.data.releases.base import DatasetLicence, Release
from med3dvlm.data.releases.m3d.layout import corpus_texts
from med3dvlm.data.releases.m3d.plan import finish, plan_m3d, preprocessing
from med3dvlm.data.releases.m3d.samples import ClosedVQADataset, OpenVQADataset, YesNoVQADataset
from med3dvlm.data.releases.m3d.synthetic import generate

RELEASE = Release(
    name="m3d",
    summary="M3D-Cap (JPEG series + reports) and M3D-VQA (CSVs), as the Hugging Face release unpacks",
    preprocessing=preprocessing,
    plan=plan_m3d,
    finish=finish,
    corpus=corpus_texts,
    tasks={
        "caption": CaptionDataset,
        "closed_vqa": ClosedVQADataset,
        "open_vqa": OpenVQADataset,
        "yes_no_vqa": YesNoVQADataset,
    },
    mixtures={
        "retrieval": ("retrieval",),
        "pretrain": ("caption", "closed_vqa", "open_vqa"),
        "finetune": ("caption", "closed_vqa", "open_vqa", "yes_no_vqa"),
    },
    synthetic=generate,
    synthetic_options=("splits", "jpeg_quality", "defect_rate", "lesion_scale", "choice_order"),
    licence=DatasetLicence(
        "apache-2.0",
        ("GoodBaiBai88/M3D-Cap", "GoodBaiBai88/M3D-VQA"),
        "M3D-Cap and M3D-VQA as released on the Hub (Apache-2.0); the scans and reports come from "
        "Radiopaedia cases, which have terms of their own",
    ),
)
