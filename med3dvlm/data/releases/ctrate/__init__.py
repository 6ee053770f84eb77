"""CT-RATE with RadGenome-ChestCT (``dataset=ctrate``): 50 k chest CT volumes with reports and 18
abnormality labels, as ``ibrahimhamamci/CT-RATE`` lays them out (:mod:`.layout`), both versions
(v1 stores HU - intercept, v2 HU), planned by :mod:`.plan`; RadGenome's region reports and VQA on the
same volumes become training samples (:mod:`.samples`); :mod:`.synthetic` writes a miniature."""

from med3dvlm.data.datasets import CaptionDataset
from med3dvlm.data.releases.base import DatasetLicence, Release
from med3dvlm.data.releases.ctrate.plan import finish, plan_ctrate, preprocessing
from med3dvlm.data.releases.ctrate.samples import RadGenomeRegionDataset, RadGenomeVQADataset
from med3dvlm.data.releases.ctrate.synthetic import generate

RELEASE = Release(
    name="ctrate",
    summary="CT-RATE's dataset/ folder ({train,valid}[_fixed]/, radiology_text_reports/, metadata/, "
    "multi_abnormality_labels/)",
    preprocessing=preprocessing,
    plan=plan_ctrate,
    finish=finish,
    caption_file="CT-RATE.json",
    options=("version", "reconstructions", "spacing", "report_sections", "validation_fraction", "radgenome"),
    tasks={
        "caption": CaptionDataset,
        "radgenome_vqa": RadGenomeVQADataset,
        "radgenome_region": RadGenomeRegionDataset,
    },
    mixtures={
        "retrieval": ("retrieval",),
        "pretrain": ("caption",),
        "finetune": ("caption", "radgenome_vqa", "radgenome_region"),
    },
    synthetic=generate,
    synthetic_options=("versions",),
    licence=DatasetLicence(
        "cc-by-nc-sa-4.0",
        ("ibrahimhamamci/CT-RATE",),
        "CT-RATE: CC BY-NC-SA 4.0 (attribution, non-commercial use, derivatives under the same terms); "
        "RadGenome-ChestCT's region reports and VQA are under CC BY-NC-SA 4.0 or CC BY 4.0 by version",
    ),
)
