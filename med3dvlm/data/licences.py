"""The licence of the data a model was trained on, by the release name ``prepare`` records
(``Preprocessing.dataset``): each release states its own (:class:`~med3dvlm.data.releases.base.DatasetLicence`)."""

from __future__ import annotations

from collections.abc import Iterable

from med3dvlm.data.releases import RELEASES
from med3dvlm.data.releases.base import DatasetLicence

OTHER = "other"


def dataset_licence(dataset: str) -> DatasetLicence:
    """The licence of the release ``dataset`` (``other``, "not known", for a name not registered)."""
    release = RELEASES.get(dataset)
    return (
        release.licence if release is not None else DatasetLicence(OTHER, (), f"{dataset}: licence not known")
    )


def combined_licence(datasets: Iterable[str]) -> str:
    """The one licence of data from all ``datasets`` when they share it, else ``other``."""
    licences = {dataset_licence(name).licence for name in datasets}
    return licences.pop() if len(licences) == 1 else OTHER
