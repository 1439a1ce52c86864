"""Every command in the README parses with the script's own flags (the walkthrough itself runs in .ci/run)."""
import importlib
import re
import shlex
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("python ") and ".py" in line.split()[1]]


def test_readme_has_the_commands():
    scripts = {shlex.split(c)[1] for c in commands()}
    assert {"data.py", "train.py", "evaluate.py", "plot.py"} <= scripts


@pytest.mark.parametrize("command", commands())
def test_readme_command_parses(command):
    argv = shlex.split(command.split("#")[0])[1:]
    module = importlib.import_module(argv[0].removesuffix(".py"))
    module.parse_args(argv[1:])  # argparse exits (failing the test) on an unknown flag or a bad value


def test_inline_commands_parse():
    for command in re.findall(r"`(python \w+\.py [^`]+)`", README):
        argv = shlex.split(command)[1:]
        importlib.import_module(argv[0].removesuffix(".py")).parse_args(argv[1:])


def test_test_command_is_the_one_ci_runs():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in README and "python3 -m pytest -q tests" in ci


def test_gpu_script_commands_parse_and_match_the_readme():
    script = (Path(__file__).resolve().parent.parent / ".ci" / "gpu").read_text()
    runs = [line.split("#")[0].split() for line in script.splitlines() if line.startswith("bench ")]
    assert len(runs) == 5
    for argv in runs:
        importlib.import_module("bench").parse_args(argv[1:])
        assert " ".join(["python", "bench.py", *argv[1:], "--json"]) in commands()
