"""The docs speak of the product: results.md is what its script makes of the result files, and no text
narrates how the code was developed."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_md_is_what_its_script_makes_of_the_result_files():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "results.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_is_a_manual_of_at_most_250_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


NARRATIVE = re.compile(r"\b(sessions? \d+|this session|last session|next session|this round)\b", re.IGNORECASE)


def test_no_development_narrative_in_code_docs_or_readme():
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("mnv2_tvm/**/*.py"), *ROOT.glob("scripts/*"),
             *ROOT.glob("targets/*.toml")]
    hits = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files if f.is_file()
            for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if NARRATIVE.search(line)]
    assert not hits, "\n".join(hits)
