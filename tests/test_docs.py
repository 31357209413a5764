"""Documents that are derived from the code stay in step with it: the error catalogue
(docs/errors.md) and the README's layout section (every module and subpackage listed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_error_catalogue_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "error_catalogue.py"), "--check"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_readme_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ", 4)]
    pkg = ROOT / "src" / "llama_adapter"
    names = [p.name for p in pkg.glob("*.py") if not p.name.startswith("_")]
    names += [p.name + "/" for p in pkg.iterdir() if (p / "__init__.py").is_file()]
    missing = [n for n in names if n not in layout]
    assert not missing, f"README layout does not mention {missing}"
