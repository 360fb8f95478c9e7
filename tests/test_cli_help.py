"""The help is true: every command listed, each command's own flags only, enum values shown,
serve's settings grouped with one line each."""

from __future__ import annotations

import argparse
import re

import pytest

from gate.cli import BLOCKLIST_SETTINGS, ENUM_FLAGS, REDIS_SETTINGS, _enum_names, build_parser
from gate.settings import GROUPS, settings_fields
from tests.gateproc import CLI

SETTING_FLAGS = {"--" + f.name.replace("_", "-") for f in settings_fields()}
FLAG = re.compile(r"^\s{2}(--[a-z-]+)", re.MULTILINE)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def help_of(*path: str) -> str:
    parser = build_parser()
    for name in path:
        parser = subcommands(parser)[name]
    return parser.format_help()


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def test_top_level_help_lists_every_command() -> None:
    import subprocess

    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    commands = subcommands(build_parser())
    assert set(commands) == {"serve", "check", "blocklist", "decisions", "model"}
    for name in commands:
        assert re.search(rf"^\s+{name}\s+\S", out, re.MULTILINE), f"{name} missing from:\n{out}"


@pytest.mark.parametrize(
    ("command", "settings"), [("blocklist", BLOCKLIST_SETTINGS), ("decisions", REDIS_SETTINGS)]
)
def test_a_redis_command_shows_only_the_settings_it_reads(command: str, settings: tuple[str, ...]) -> None:
    flags = set(FLAG.findall(help_of(command)))
    shown = flags & SETTING_FLAGS
    assert shown == {"--" + s.replace("_", "-") for s in settings}


def test_check_shows_no_settings() -> None:
    assert not set(FLAG.findall(help_of("check"))) & SETTING_FLAGS


@pytest.mark.parametrize("flag", sorted(ENUM_FLAGS))
def test_every_enum_flag_of_check_lists_its_values(flag: str) -> None:
    _field, enum, prefix = ENUM_FLAGS[flag]
    names = _enum_names(enum, prefix)
    assert len(names) >= 3 and "UNSPECIFIED" not in names
    [line] = [x for x in help_of("check").splitlines() if x.lstrip().startswith(f"--{flag} ")]
    for name in names:
        assert name in line, (name, line)


def test_enum_values_are_accepted_in_any_case() -> None:
    args = build_parser().parse_args(["check", "--reason", "changed_mind", "--payment", "Wallet"])
    assert (args.reason, args.payment) == ("CHANGED_MIND", "WALLET")


def test_every_setting_is_in_exactly_one_group() -> None:
    grouped = [name for _, (_, members) in GROUPS.items() for name in members]
    assert sorted(grouped) == sorted(f.name for f in settings_fields())
    assert list(GROUPS) == ["server", "Redis", "model", "budget and policy", "telemetry"]


def test_serve_help_groups_the_settings_with_one_line_each() -> None:
    text = help_of("serve")
    sections = re.split(r"^(\S[^\n]*settings):\n", text, flags=re.MULTILINE)
    found = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert list(found) == [f"{title} settings" for title in GROUPS]
    for title, (about, members) in GROUPS.items():
        body = found[f"{title} settings"]
        assert body.lstrip().startswith(about), title
        for name in members:
            flag = "--" + name.replace("_", "-")
            lines = [x for x in body.splitlines() if re.match(rf"\s+{flag}[ ,]", x)]
            assert len(lines) == 1, (flag, body)
            line = lines[0]
            assert f"[GATE_{name.upper()}]" in line, line  # flag, help and variable on one line
