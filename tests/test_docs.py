"""Every example in the README and on the documentation site runs as shown.

Each page's ```python and ```bash blocks run in order in a fresh folder (tests/docs/run_blocks.py): Python blocks
share one namespace, shell blocks run with the test venv's ``bin`` first on PATH, as after the README's install.
```text blocks (output, command synopses) are shown, not run.  An HTML comment on the line above a fence changes how
it runs:

- ``<!-- skip: REASON -->``: not run (a docker command, an install); the reason is required.
- ``<!-- background: URL -->``: a one-command server, started in the background, the next block run once URL
  answers, stopped with SIGINT when the page ends.
- ``<!-- onnx2tf -->``: the page runs in the onnx2tf venv (its Python; the main venv's commands after it on
  PATH), in CI's onnx2tf job (``-m onnx2tf``).
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgeattn.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
O2T_VENV = Path(os.environ.get("EDGEATTN_ONNX2TF_VENV", ROOT / ".venv-onnx2tf"))
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*(skip|background|onnx2tf)\s*(?::\s*(.*?))?\s*-->\s*$")
RUN = ("python", "bash")
SHOWN = ("text", "", "yaml", "json", "cpp", "toml")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(page: Path) -> list[dict]:
    """The page's fenced blocks: lang, code, where (page:line), and the marker above the fence."""
    lines, found, i = page.read_text().splitlines(), [], 0
    name = page.relative_to(ROOT)
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{name}:{i + 1}: a code block that never closes"
        mark = MARK.match(lines[i - 1]) if i else None
        found.append(
            {
                "lang": fence.group(1),
                "code": "\n".join(lines[i + 1 : end]),
                "where": f"{name}:{i + 1}",
                "mark": mark.group(1) if mark else None,
                "reason": (mark.group(2) or "") if mark else "",
                "background": mark.group(2) if mark and mark.group(1) == "background" else None,
            }
        )
        i = end + 1
    return found


def _params():
    for page in pages():
        marks = {b["mark"] for b in blocks(page)}
        # a server shares the CPUs with nothing timed: the serial group (tests/conftest.py)
        extra = [pytest.mark.xdist_group("serial")] if "background" in marks else []
        yield pytest.param(
            page, id=str(page.relative_to(ROOT)), marks=extra + ([pytest.mark.onnx2tf] if "onnx2tf" in marks else [])
        )


def test_every_block_says_how_it_runs():
    """A block is run, or shown (output, a synopsis), or skipped with its reason: never silently left out."""
    for page in pages():
        for block in blocks(page):
            assert block["lang"] in RUN + SHOWN, f"{block['where']}: unknown block language {block['lang']!r}"
            if block["mark"] == "skip":
                assert len(block["reason"]) > 10, f"{block['where']}: a skipped block needs its reason"
            if block["mark"] == "background":
                assert block["background"].startswith("http") and "\n" not in block["code"], block["where"]


@pytest.mark.parametrize("page", list(_params()))
def test_page_examples_run(page, tmp_path):
    runnable = [b for b in blocks(page) if b["lang"] in RUN and b["mark"] != "skip"]
    if not runnable:
        return
    python, env = sys.executable, dict(os.environ)
    if any(b["mark"] == "onnx2tf" for b in blocks(page)):
        python = O2T_VENV / "bin" / "python"
        if not python.is_file():
            if os.environ.get("EDGEATTN_REQUIRE_ONNX2TF") == "1":
                pytest.fail(f"{python} is missing: build it with `python3 -m venv {O2T_VENV}` (.ci/run does)")
            pytest.skip(f"no onnx2tf environment at {O2T_VENV} (tests/test_deploy.py's docstring)")
        env["PATH"] = f"{os.environ['PATH']}{os.pathsep}{Path(sys.executable).parent}"
    env["MPLBACKEND"] = "Agg"
    done = subprocess.run(
        [str(python), str(ROOT / "tests" / "docs" / "run_blocks.py")],
        input=json.dumps(runnable),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"


def test_cli_page_names_every_option():
    """docs/cli.md names every command of the parser edgeattn.cli builds (``edgeattn masks show``...) and every option
    string of each (``-o`` and ``--output``; hidden ones too, such as export's ``--inline``), so an option added to the
    CLI cannot go undocumented.  An option counts only as a whole word: ``--inputs`` does not name ``--input``."""
    page = (ROOT / "docs" / "cli.md").read_text()
    missing = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            for option in action.option_strings:
                if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page):
                    missing.append(f"{command} {option}")
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    if f"{command} {name}" not in page:
                        missing.append(f"{command} {name}")
                    walk(sub, f"{command} {name}")

    walk(_parser(), "edgeattn")
    assert not missing, f"docs/cli.md does not name: {', '.join(missing)}"
