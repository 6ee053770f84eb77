"""CT-RATE and RadGenome-ChestCT as their owners lay them out (datasets.md §2-§3).

CT-RATE (``ibrahimhamamci/CT-RATE``, its ``dataset/`` folder)::

    {train,valid}/<split>_<patient>/<split>_<patient>_<scan>/<split>_<patient>_<scan>_<recon>.nii.gz   v1
    {train,valid}_fixed/...  (the same names)                                                          v2
    radiology_text_reports/{train,validation}_reports.csv   VolumeName, ..., Findings_EN, Impressions_EN
    metadata/{train,validation}_metadata.csv                44 columns: RescaleSlope, RescaleIntercept,
                                                            XYSpacing ("[x, y]"), ZSpacing, ...
    multi_abnormality_labels/{train,valid}_predicted_labels.csv   VolumeName + the 18 labels

v1 stores HU - intercept; v2 ("fixed") stores HU under the same metadata, so the rescale applies to
v1 only. RadGenome-ChestCT's ``radgenome_files``: ``{train,validation}_{region_report,
vqa_abnormality, vqa_location, vqa_presence, vqa_size, case_disorders}.csv``, joined to the volumes
by ``Volumename`` (CT-RATE's ``VolumeName``).
"""

from __future__ import annotations

# The 18 binary columns of CT-RATE's multi_abnormality_labels CSVs, in column order (CT-CLIP's
# zero_shot.py list; bootstrap_values.py names index 1 'Calcification', a column name only).
CTRATE_LABELS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

VERSIONS: tuple[str, ...] = ("v1", "v2")
SPLITS: tuple[str, ...] = ("train", "valid")
# Volume folders per version and split; the fixed (v2) upload adds "_fixed".
VOLUME_DIRS: dict[str, dict[str, str]] = {
    "v1": {"train": "train", "valid": "valid"},
    "v2": {"train": "train_fixed", "valid": "valid_fixed"},
}
# Reports, metadata and RadGenome spell the validation split out; the label files do not.
CSV_SPLIT: dict[str, str] = {"train": "train", "valid": "validation"}
DATASET_DIR = "dataset"
RADGENOME_DIR = "radgenome"
REPORT_COLUMNS: tuple[str, ...] = (
    "VolumeName",
    "ClinicalInformation_EN",
    "Technique_EN",
    "Findings_EN",
    "Impressions_EN",
)
METADATA_COLUMNS: tuple[str, ...] = (
    "VolumeName", "Manufacturer", "SeriesDescription", "ManufacturerModelName", "PatientSex",
    "PatientAge", "ReconstructionDiameter", "DistanceSourceToDetector", "DistanceSourceToPatient",
    "GantryDetectorTilt", "TableHeight", "RotationDirection", "ExposureTime", "XRayTubeCurrent",
    "Exposure", "FilterType", "GeneratorPower", "FocalSpots", "ConvolutionKernel", "PatientPosition",
    "RevolutionTime", "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed",
    "TableFeedPerRotation", "SpiralPitchFactor", "DataCollectionCenterPatient",
    "ReconstructionTargetCenterPatient", "ExposureModulationType", "CTDIvol", "ImagePositionPatient",
    "ImageOrientationPatient", "SliceLocation", "SamplesPerPixel", "PhotometricInterpretation", "Rows",
    "Columns", "XYSpacing", "RescaleIntercept", "RescaleSlope", "RescaleType", "NumberofSlices",
    "ZSpacing", "StudyDate",
)  # fmt: skip
LABEL_COLUMNS: tuple[str, ...] = ("VolumeName", *CTRATE_LABELS)
RADGENOME_COLUMNS: dict[str, tuple[str, ...]] = {
    "region_report": ("Volumename", "Anatomy", "Sentence"),
    "vqa_abnormality": ("Volumename", "Anatomy", "Abnormality"),
    "vqa_location": ("Volumename", "Anatomy", "Abnormality"),
    "vqa_presence": ("Volumename", "Anatomy", "Finding", "Presence"),
    "vqa_size": ("Volumename", "Anatomy", "Abnormality", "Size"),
    "case_disorders": ("Volumename", "Disorders"),
}
NOT_GIVEN = "Not given."
