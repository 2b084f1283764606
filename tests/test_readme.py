import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    setup_and_demo, tests = readme_commands()[:2]
    assert "torch==2.13.0" in setup_and_demo and "edgeattn export" in setup_and_demo and "--check" in setup_and_demo
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_demo_model_is_registered():
    from edgeattn import models

    model = re.search(r"edgeattn export (\S+)", readme_commands()[0]).group(1)
    assert model in models.names()
