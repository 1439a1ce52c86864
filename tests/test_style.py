"""The style the project keeps, checked without extra packages: the line limit in ruff.toml, no unused
imports, no trailing whitespace or tabs."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.glob("*.py"), *ROOT.glob("tests/*.py")])
LIMIT = int(re.search(r"line-length\s*=\s*(\d+)", (ROOT / "ruff.toml").read_text()).group(1))


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_lines_within_the_limit_and_clean(path):
    bad = [
        f"{path.name}:{n}: {len(line)} characters"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if len(line) > LIMIT
    ]
    bad += [
        f"{path.name}:{n}: trailing whitespace or tab"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if line != line.rstrip() or "\t" in line
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_unused_imports(path):
    tree = ast.parse(path.read_text())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                imported[(alias.asname or alias.name).split(".")[0]] = node.lineno
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.value.id for node in ast.walk(tree) if isinstance(node, ast.Attribute)
             and isinstance(node.value, ast.Name)}
    unused = sorted(f"{name} (line {line})" for name, line in imported.items() if name not in used)
    assert not unused, f"{path.name}: unused imports {unused}"


def test_the_check_catches_what_it_should(tmp_path):
    (tmp_path / "bad.py").write_text("import os\nx = 1" + " " * 120 + "\n")
    with pytest.raises(AssertionError, match="unused imports"):
        test_no_unused_imports(tmp_path / "bad.py")
    with pytest.raises(AssertionError, match="characters"):
        test_lines_within_the_limit_and_clean(tmp_path / "bad.py")
