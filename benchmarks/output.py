"""Where every benchmark leaves its figures: ``<out>/<name>.json`` and ``<out>/<name>.md``."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: Path, name: str, res: dict, markdown: str) -> dict:
    """Write the raw results and their markdown table, print the table, return ``res``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    (out / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    return res
