"""Smoke runs of the study scripts under examples/ (their --quick modes), so they keep working."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "flickr8k_1k"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/flickr8k_1k")
def test_visual_tokens_quick_writes_both_tables(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "visual_tokens.py"), "--quick", "--configs", "V1,VQ-10",
           "--out", str(tmp_path / "vt"), "--threads", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True, timeout=900)
    text = (tmp_path / "vt-quick" / "visual_tokens.md").read_text()
    # OCR/MME table: one row per configuration with an MME score out of 1000
    assert re.search(r"^\| V1 \| 1 \(global\) \| [\d.]+ \|.*\| \d+ / 1000 \|", text, re.M)
    assert re.search(r"^\| VQ-10 \| 10 \|", text, re.M)
    # captions table: both configurations with a CIDEr-D for the photo and for the grey image
    captions = text.split("## Captions", 1)[1]
    assert re.search(r"^\| V1 \| 1 \(global\) \| \d+\.\d{3} \| \d+\.\d{3} \|", captions, re.M)
    assert re.search(r"^\| VQ-10 \| 10 \| \d+\.\d{3} \| \d+\.\d{3} \|", captions, re.M)
    assert len(list((tmp_path / "vt-quick").glob("cap-*-s0.json"))) == 2
