"""The man pages cover what --help offers: every azaionctl command and option, every azaiond
option, and every exit status."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from azaiond.cli import exitcodes
from azaiond.cli.main import build_parser

MAN = Path(__file__).resolve().parent.parent / "docs" / "man"


def _text(page: str) -> str:
    # The man source with roff escapes undone: "\-" is "-", font changes are dropped.
    raw = (MAN / page).read_text(encoding="utf-8")
    return re.sub(r"\\f[BIRP]", "", raw).replace("\\-", "-")


def _options(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", help_text))


def _help(*argv: str) -> str:
    done = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=30, check=True)
    return done.stdout


def test_azionctl_page_covers_every_command_and_option() -> None:
    page = _text("azaionctl.1")
    parser = build_parser()
    top = parser.format_help()
    listing = top.split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    names = re.findall(r"^    ([a-z][a-z-]*)\b", listing, re.M)
    assert {"metrics", "version", "help", "credential"} <= set(names)
    for name in names:
        assert re.search(rf"^\.B[IR]? \"?{re.escape(name)}\b", page, re.M), f"azaionctl.1 lacks command {name}"
        if name == "seal-images":
            continue
        text = _help("-m", "azaiond.cli.main", name)
        if name == "credential":
            text += _help("-m", "azaiond.cli.main", "credential", "login")
        for option in _options(text):
            assert option in page, f"azaionctl.1 lacks {option} of {name}"
    for code, _ in exitcodes.table_rows():
        assert re.search(rf"^{code}\t", page, re.M), f"azaionctl.1 lacks exit status {code}"


def test_azaiond_page_covers_options_signals_and_exit_statuses() -> None:
    page = _text("azaiond.8")
    for option in _options(_help("-m", "azaiond.daemon")):
        assert option in page, f"azaiond.8 lacks {option}"
    for signal_name in ("SIGTERM", "SIGINT", "SIGHUP"):
        assert signal_name in page
    section = page.split(".SH EXIT STATUS", 1)[1].split(".SH", 1)[0]
    for code in ("0", "1", "2"):
        assert f".B {code}\n" in section


def _complete(*words: str) -> set[str]:
    """What the shipped bash completion offers after ``azaionctl WORDS...`` (the last word is
    the one being completed)."""
    script = (
        "source /usr/share/bash-completion/bash_completion\n"
        f"source {COMPLETION}\n"
        'COMP_WORDS=(azaionctl "$@"); COMP_CWORD=$#; COMP_LINE="azaionctl $*"; COMP_POINT=${#COMP_LINE}\n'
        "_azaionctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", script, "complete", *words], capture_output=True, text=True,
                          timeout=30, check=True)
    return set(done.stdout.split())


COMPLETION = Path(__file__).resolve().parent.parent / "debian" / "completion" / "azaionctl"


def test_bash_completion_offers_every_command_and_their_options() -> None:
    parser = build_parser()
    listing = parser.format_help().split("COMMAND\n", 1)[1].split("\noptions:", 1)[0]
    names = set(re.findall(r"^    ([a-z][a-z-]*)\b", listing, re.M))
    assert names <= _complete("")
    assert {"cache", "api-load", "doctor"} <= _complete("")
    assert {"ls", "drop", "prefetch"} <= _complete("cache", "")
    assert "--format" in _complete("upload", "-")
    assert {"1", "2"} == _complete("upload", "--format", "")
    assert {"--folder", "--output"} <= _complete("load", "x", "--")
