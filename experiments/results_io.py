"""Where an experiment's results land: NAME.md (the table it prints) and NAME.json (the raw rows) in one
folder, experiments/results/ by default."""

from __future__ import annotations

import json
import os


def write_results(out_dir: str, name: str, lines: list[str], data) -> None:
    """Write the markdown lines to out_dir/NAME.md and data to out_dir/NAME.json, then print the table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(data, fh, indent=2)
    print("\n".join(lines))
