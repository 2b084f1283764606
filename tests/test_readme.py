import re
from pathlib import Path

from edgeattn import models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", README)


def test_readme_has_the_two_commands_and_ci_runs_both_as_written():
    setup_and_demo, tests = readme_commands()[:2]
    assert "torch==2.13.0" in setup_and_demo and "edgeattn export" in setup_and_demo and "--check" in setup_and_demo
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert setup_and_demo in ci and tests in ci


def test_readme_demo_model_is_registered():
    model = re.search(r"edgeattn export (\S+)", readme_commands()[0]).group(1)
    assert model in models.names()


def test_readme_fits_on_a_screen_and_its_links_resolve():
    """At most 150 lines, a Python example of at most 15; every relative link and picture names a file here."""
    assert len(README.splitlines()) <= 150
    (python,) = re.findall(r"```python\n(.+?)\n```", README, flags=re.S)
    assert len(python.splitlines()) <= 15
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert targets
    for target in targets:
        if not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to {target}, which is not in the repository"
