"""Every command in the README parses with the script's own flags (the walkthrough itself runs in .ci/run),
and the README shows the walkthrough script's commands as they are."""

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RESULTS = (ROOT / "RESULTS.md").read_text()  # the measurements' commands must parse too


def script_argv(line):
    """['train.py', flags...] of a command line: python X.py ..., or torchrun ... X.py ..."""
    words = shlex.split(line.split(" #")[0])
    start = next(i for i, w in enumerate(words) if w.endswith(".py"))
    return words[start:]


def commands(text=README):
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if re.match(r"\s*(python|torchrun) .*\.py", line)]


def test_readme_has_the_commands():
    scripts = {script_argv(c)[0] for c in commands()}
    assert {"data.py", "train.py", "evaluate.py", "plot.py", "qwen3.py", "bench.py"} <= scripts


@pytest.mark.parametrize("command", commands() + commands(RESULTS))
def test_readme_command_parses(command):
    argv = script_argv(command)
    module = importlib.import_module(argv[0].removesuffix(".py"))
    module.parse_args([a for a in argv[1:] if a != "..."])  # argparse exits (failing the test) on a bad flag


def test_inline_commands_parse():
    for command in re.findall(r"`(python \w+\.py [^`]+)`", README + RESULTS):
        argv = script_argv(command)
        importlib.import_module(argv[0].removesuffix(".py")).parse_args([a for a in argv[1:] if a != "..."])


def test_walkthrough_block_is_the_script():
    shown = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", README, re.S).group(
        1
    )
    script = (ROOT / "walkthrough.sh").read_text()
    ran = re.search(r"# <!-- walkthrough -->\n(.*?)# <!-- /walkthrough -->", script, re.S).group(1)
    assert shown == ran
    assert "bash walkthrough.sh" in README and "bash walkthrough.sh" in (ROOT / ".ci" / "run").read_text()


def test_ci_installs_as_a_newcomer_and_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in README and "python -m pytest -q tests" in ci
    # a fresh virtual environment each run: the newest releases requirements.txt allows, as a newcomer gets
    assert "python3 -m venv" in ci and "install --quiet --disable-pip-version-check -r requirements.txt" in ci
    assert "python3 -m venv" in README and "pip install -r requirements.txt" in README


def test_gpu_checks_parse_with_their_scripts_flags(tmp_path):
    """Every script command of .ci/gpu (printed by a `check` that runs nothing) parses with its flags."""
    listing = f'source .ci/gpu; check() {{ shift; printf "%q " "$@"; echo; }}; OUT={tmp_path} main'
    printed = subprocess.run(["bash", "-c", listing], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    lines = [shlex.split(line) for line in printed.stdout.splitlines()]
    scripts = [words[1:] for words in lines if words[0] == "python3" and words[1].endswith(".py")]
    assert len(scripts) >= 15 and {argv[0] for argv in scripts} == {"evaluate.py", "train.py", "bench.py"}
    for argv in scripts:
        importlib.import_module(argv[0].removesuffix(".py")).parse_args(argv[1:])


def test_a_reader_meets_the_reference_run_early_and_every_file_in_the_code_map():
    reference = "python train.py --data_path deepseek-r1-math-train --validation_size 25"
    first = next(n for n, line in enumerate(README.splitlines(), 1) if line.startswith(reference))
    assert first <= 150, first
    code_map = README[README.index("## The code"):]
    for path in [*ROOT.glob("*.py"), ROOT / "walkthrough.sh"]:
        assert f"`{path.name}`" in code_map, path.name
