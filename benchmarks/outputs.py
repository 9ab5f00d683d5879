"""What a benchmark that reads finished runs writes: its findings as JSON and as Markdown, the Markdown also printed."""
from __future__ import annotations

import json
from pathlib import Path


def write(out: Path, found, markdown: str) -> None:
    """`out`.json and `out`.md (their folder made if missing); call it only once every input has been checked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(found, indent=2))
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
