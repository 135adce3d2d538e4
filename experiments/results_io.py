"""Where an experiment's results land: NAME.md (the table it prints) and NAME.json (the raw rows) in one
folder, experiments/results/ by default."""

from __future__ import annotations

import json
import os


def write_results(out_dir: str, name: str, lines: list[str], data, keep_from: str | None = None) -> None:
    """Write the markdown lines to out_dir/NAME.md and data to out_dir/NAME.json, then print the table.
    keep_from: a heading (e.g. "## Reading"); the existing NAME.md's text from its first such line on (the
    readings written by hand after earlier runs) is kept after the new tables."""
    os.makedirs(out_dir, exist_ok=True)
    md = os.path.join(out_dir, f"{name}.md")
    kept = ""
    if keep_from and os.path.exists(md):
        with open(md) as fh:
            old = fh.read()
        marker = "\n" + keep_from
        kept = old[old.index(marker):] if marker in old else ""
    with open(md, "w") as fh:
        fh.write("\n".join(lines) + "\n" + kept)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(data, fh, indent=2)
    print("\n".join(lines))
