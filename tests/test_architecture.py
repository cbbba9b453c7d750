"""docs/architecture.md's import rules hold: every import of an azaiond module is one a row allows."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


def _rules() -> list[tuple[list[str], list[str]]]:
    text = DOC.read_text()
    section = text.split("## Import rules", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("modules", "---"):
            continue
        rows.append((re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])))
    assert rows, "no import rules table in docs/architecture.md"
    services = rows[0][0]
    return [(mods, [x for a in allowed for x in (services if a == "services" else [a])]) for mods, allowed in rows]


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or (p.endswith(".*") and name == p[:-2]) for p in patterns)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT / "azaiond").with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as written (``from azaiond import x`` counts as azaiond.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "azaiond":  # a submodule, or a name of the package (its version)
                pkg = ROOT / "azaiond"
                names = [a.name for a in node.names]
                found.update(f"azaiond.{n}" for n in names if (pkg / f"{n}.py").exists() or (pkg / n).is_dir())
    return found


def test_every_module_has_exactly_one_rule() -> None:
    rules = _rules()
    for path in sorted((ROOT / "azaiond").rglob("*.py")):
        module = _module(path)
        if not module:
            continue
        rows = [mods for mods, _ in rules if _matches(module, mods)]
        assert len(rows) == 1, f"{module}: matched by {len(rows)} rows of the import rules table"


def test_imports_follow_the_rules() -> None:
    rules = _rules()
    broken: list[str] = []
    for path in sorted((ROOT / "azaiond").rglob("*.py")):
        module = _module(path)
        if not module:
            continue
        allowed = next(allowed for mods, allowed in rules if _matches(module, mods))
        for imported in sorted(_imports(path)):
            top = imported.split(".")[0]
            if top in ("tests", "scripts"):
                broken.append(f"{module} -> {imported} (nothing in azaiond imports tests or scripts)")
            elif top == "azaiond" and imported != "azaiond":
                target = imported.removeprefix("azaiond.")
                if target != module and not _matches(target, allowed):
                    broken.append(f"{module} -> {target}")
    assert not broken, "imports that docs/architecture.md forbids:\n" + "\n".join(broken)


def test_the_rules_catch_a_forbidden_arrow() -> None:
    # The checker itself: a service importing the RPC layer is refused by the table.
    rules = _rules()
    allowed = next(allowed for mods, allowed in rules if _matches("resources", mods))
    assert not _matches("rpc.server", allowed)
    assert not _matches("wiring", allowed)
    cli_allowed = next(allowed for mods, allowed in rules if _matches("cli.main", mods))
    assert not _matches("handlers", cli_allowed) and _matches("client", cli_allowed)


def _test_module_imports(path: Path) -> list[str]:
    """The test modules (``tests/test_*.py``) that ``path`` imports, however it is spelled."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[-1].startswith("test_")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""  # "from . import test_x" has no module
            if module.split(".")[-1].startswith("test_"):
                found.append(module)
            elif module in ("tests", ""):
                found += [f"tests.{a.name}" for a in node.names if a.name.startswith("test_")]
    return found


def test_no_test_module_imports_another() -> None:
    # Shared helpers live in tests/support/ and the fixtures_*.py plugins, so each test module
    # can be read, run and changed on its own.
    broken = [f"{p.relative_to(ROOT)} -> {m}" for p in sorted((ROOT / "tests").rglob("*.py"))
              for m in _test_module_imports(p)]
    assert not broken, "test modules importing test modules:\n" + "\n".join(broken)


def test_the_test_import_check_sees_each_spelling(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from tests.test_a import x\nfrom tests import test_b\nimport tests.test_c\nfrom tests import fixtures_d\n"
    )
    assert _test_module_imports(sample) == ["tests.test_a", "tests.test_b", "tests.test_c"]
