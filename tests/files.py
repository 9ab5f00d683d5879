"""What "nothing was written" is checked against: every folder and file under some folders, with file hashes."""
from __future__ import annotations

import hashlib
from pathlib import Path


def snapshot(*folders: Path) -> dict[str, str]:
    """Every folder and file under `folders` (a missing folder has none), files with their SHA-256."""
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for f in map(Path, folders) if f.exists() for p in sorted(f.rglob("*"))}
