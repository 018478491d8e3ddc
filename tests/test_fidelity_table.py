"""docs/fidelity.md is checked against the composed `experiment=paper_p2o`: every `key.path=value` written in a
table's "here" column must be what the preset gives. A cell that starts with `group=name`: is checked with that
group override (e.g. the teacher's model name under reflection=teacher)."""

from __future__ import annotations

import re

import pytest
import yaml
from omegaconf import OmegaConf

from p2o_hpc.config import RunConfig, register_configs
from p2o_hpc.paths import REPO_ROOT

TABLE = REPO_ROOT / "docs" / "fidelity.md"
SPAN = re.compile(r"`([^`]+)`")
SETTING = re.compile(r"^([a-z_]+(?:\.[a-z_0-9]+)+)=(\S.*)$")
CONTEXT = re.compile(r"^`([a-z_]+=[a-z_0-9]+)`\s*:")
GROUPS = {path.name for path in (REPO_ROOT / "conf").iterdir() if path.is_dir()}


def here_cells() -> list[tuple[str, str]]:
    """(row name, "here" cell) of every table row whose header names a "here" column."""
    cells, column = [], None
    for line in TABLE.read_text().splitlines():
        if not line.startswith("|"):
            column = None
            continue
        parts = [part.strip() for part in line.strip().strip("|").split("|")]
        if column is None:
            column = next((i for i, part in enumerate(parts) if part.startswith("here")), None)
        elif not set(line) <= set("|-: ") and len(parts) > column:
            cells.append((parts[0], parts[column]))
    return cells


def settings(cell: str) -> tuple[str | None, list[tuple[str, object]]]:
    context = CONTEXT.match(cell)
    found = []
    for span in SPAN.findall(cell):
        match = SETTING.match(span)
        if match and match.group(1).split(".")[0] in RunConfig.__dataclass_fields__ and " " not in span:
            value = yaml.safe_load(match.group(2))
            if isinstance(value, str):  # YAML 1.1 reads 1e-6 as text; Hydra reads it as a float
                try:
                    value = float(value)
                except ValueError:
                    pass
            found.append((match.group(1), value))
    return (context.group(1) if context and context.group(1).split("=")[0] in GROUPS else None), found


def composed(override: str | None) -> tuple[dict, dict]:
    """The preset as written (interpolations kept) and resolved."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=paper_p2o"] + ([override] if override else []))
    return OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(cfg, resolve=True)


def same(actual, value) -> bool:
    return actual == value or (isinstance(actual, float) and isinstance(value, (int, float))
                               and actual == pytest.approx(value))


def lookup(tree: dict, dotted: str):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def test_every_value_in_the_fidelity_table_is_the_presets(monkeypatch):
    for variable in ("P2O_TEACHER_MODEL", "P2O_TEACHER_BASE_URL"):  # the table states the defaults
        monkeypatch.delenv(variable, raising=False)
    configs: dict[str | None, tuple[dict, dict]] = {}
    checked, wrong = 0, []
    for row, cell in here_cells():
        context, found = settings(cell)
        if context not in configs:
            configs[context] = composed(context)
        for key, value in found:
            written, resolved = configs[context]
            try:
                actual = [lookup(written, key), lookup(resolved, key)]
            except KeyError:
                wrong.append(f"{row!r}: {key} is not a config key")
                continue
            checked += 1
            if not any(same(candidate, value) for candidate in actual):
                wrong.append(f"{row!r}: table says {key}={value!r}, experiment=paper_p2o"
                             f"{' ' + context if context else ''} gives {actual[1]!r}")
    assert not wrong, "\n".join(wrong)
    assert checked >= 40, f"only {checked} settings found: the table's format changed?"
    assert {None, "reflection=teacher", "data=deepmath"} <= set(configs)


def test_readme_links_the_table():
    assert "docs/fidelity.md" in (REPO_ROOT / "README.md").read_text()
