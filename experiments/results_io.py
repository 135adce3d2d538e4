"""Where an experiment's results land: NAME.md (the table it prints) and NAME.json (the raw rows) in one
folder, experiments/results/ by default."""

from __future__ import annotations

import json
import os
import platform


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


def cpu_summary() -> str:
    """The CPU's model name and the vector extensions that decide fp32 matmul rates (from /proc/cpuinfo):
    the ratio of our step to the torch peer's moves with them (experiments/results/train_speed.md)."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
    ext = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name} ({', '.join(ext) or 'no AVX2'})"
