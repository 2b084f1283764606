"""Every script in samples/ runs as a user would run it, at a small size, and exits 0: each exits non-zero itself
when its file's outputs differ from PyTorch's (or torch's reference library's)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the arguments that keep each sample small; a sample not listed runs with its defaults
SMALL = {
    "classify_image.py": ["--model", "nat-tiny"],
    "convert_hf_lm.py": ["--new-tokens", "8"],
    "lm_generate.py": ["--tokens", "4"],
    "video_block.py": ["--frames", "4", "--runs", "2"],
}


def test_every_sample_is_listed_or_runs_with_defaults():
    assert set(SMALL) <= {p.name for p in (ROOT / "samples").glob("*.py")}


@pytest.mark.parametrize("sample", sorted(p.name for p in (ROOT / "samples").glob("*.py")))
def test_sample_runs(sample, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "samples" / sample), *SMALL.get(sample, []), "--out", str(tmp_path)],
        cwd=tmp_path,
        env=dict(os.environ, MPLBACKEND="Agg"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
