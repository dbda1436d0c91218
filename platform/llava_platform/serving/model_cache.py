"""Keep the replica's model download cache bounded: after a reload, old complete entries go.

`llava_platform.model_uri` downloads each registered version once into the cache and marks an
entry complete last. Every promotion adds an entry, so without pruning the cache grows by one
model per reload. Here the newest `keep` complete entries stay, and so does every directory still
being served (the old model keeps answering its in-flight requests until its engine drains).
Local directories served in place are never inside the cache and are never touched.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from llava_platform.model_uri import COMPLETE_MARKER

log = logging.getLogger("llava.serving")


def complete_entries(cache_dir: Path) -> list[Path]:
    """Complete cache entries, newest first (by when their marker was written)."""
    markers = [m for m in cache_dir.rglob(COMPLETE_MARKER) if m.is_file()]
    markers.sort(key=lambda m: m.stat().st_mtime_ns, reverse=True)
    return [m.parent for m in markers]


def prune(cache_dir: str | Path | None, keep: int, in_use: Iterable[str | Path]) -> list[Path]:
    """Remove all but the newest `keep` entries and those in use; return what was removed."""
    if cache_dir is None or not Path(cache_dir).is_dir():
        return []
    used = {Path(p).resolve() for p in in_use}
    removed = []
    for entry in complete_entries(Path(cache_dir))[keep:]:
        if entry.resolve() in used:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.info("model cache: removed %s", entry)
    return removed
