"""Every file in configs/ is of one kind: a flat mapping of one command's keys, read by one loader
(train/config.py's read_yaml_mapping), whose first comment line says what it is and which names
the command that takes it. Each loads, with its command's schema, into a valid config."""
from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from draftdistill.cli import drafter_trainer, main
from draftdistill.opd import OPDConfig
from draftdistill.train import Eagle3Config, load_config
from draftdistill.train.config import read_yaml_mapping

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def command_of(path: Path) -> str:
    """The command a config's header names: `draftdistill <command> ...`."""
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    found = re.findall(r"draftdistill ((?:bench )?\w+)", header)
    assert found, f"{path}: its header names no draftdistill command"
    return found[0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_loads_with_its_commands_schema(path):
    assert path.read_text().startswith("# ")
    values = read_yaml_mapping(path)
    assert values and all(not isinstance(v, dict) or k == "teachers" for k, v in values.items())  # flat
    command = command_of(path)
    if command == "train":
        config_class, _ = drafter_trainer(str(path), ())
        cfg = load_config(config_class, path)
        assert (config_class is Eagle3Config) == (cfg.drafter == "eagle3")
    elif command == "opd":
        load_config(OPDConfig, path)
    else:  # eval / bench spec: the keys are the command's option names
        group_and_name = command.split()
        cmd = main
        for name in group_and_name:
            cmd = cmd.commands[name]
        options = {opt.lstrip("-").replace("-", "_") for p in cmd.params for opt in p.opts}
        assert set(k.replace("-", "_") for k in values) <= options, (path, sorted(set(values) - options))
        assert isinstance(cmd, click.Command)
