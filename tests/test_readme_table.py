"""The README's performance table is the one experiments/readme_table.py generates from experiments/results/."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import readme_table  # noqa: E402


def test_readme_performance_table_is_current():
    out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "readme_table.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_a_hand_edited_figure_is_caught():
    with open(readme_table.README) as fh:
        text = fh.read()
    table = text.split(readme_table.BEGIN, 1)[1].split(readme_table.END, 1)[0]
    assert "| train step" in table                                 # the rows come from the committed JSON
    edited = text.replace(table, table.replace("tokens/s", "tokens/sec", 1))
    assert edited != text and readme_table.updated_readme(edited) == text
