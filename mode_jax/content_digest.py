"""Content digests of the files a run reads (the checkpoint directory, the calibration JSON), so
that stage fingerprints follow what the files hold, not where they lie.

Keyed by path alone, a checkpoint rewritten in place (re-downloaded, fine-tuned into the same
directory) kept its fingerprints, and every stage reused artifacts made from the old weights;
the same checkpoint moved or cloned elsewhere recomputed everything. A path's digest is the
sha256 over its regular files' relative names, sizes and sha256s (directories walked
recursively; names starting with "." skipped). Hashing a 30B checkpoint reads tens of GB, so
each file's sha256 is cached in a JSON file keyed by (absolute path, size, mtime_ns, inode), as
git's index does: a rerun stats the files and reads none, a file rewritten in place is hashed
again, and if its bytes did not change neither does any fingerprint. Entries of files that no
longer exist are dropped when the cache is next read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)
DIGEST_CHARS = 16  # hex digits of a digest
LOG_ABOVE_BYTES = 1 << 30  # say so before hashing this much (a first run on a real checkpoint)


def digest(path: str, cache_path: str | None = None) -> str:
    """16 hex digits naming the content of the file or directory ``path``.

    ``cache_path``: a JSON file of per-file sha256s to read and update (None: hash everything).
    Raises FileNotFoundError naming ``path`` when it does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = _files(path)
    cache = _load_cache(cache_path)
    stamps = {full: os.stat(full) for _, full in files}
    stale = [full for full, st in stamps.items() if cache.get(full, [None])[0] != _stamp(st)]
    stale_bytes = sum(stamps[f].st_size for f in stale)
    if stale_bytes > LOG_ABOVE_BYTES:
        log.info("hashing %d files of %s (%.1f GB) to fingerprint their content; cached for "
                 "later runs", len(stale), path, stale_bytes / 1e9)
    for full in stale:
        with open(full, "rb") as f:
            cache[full] = [_stamp(stamps[full]), hashlib.file_digest(f, "sha256").hexdigest()]
    gone = [full for full in cache if full not in stamps and not os.path.exists(full)]
    for full in gone:  # deleted or moved files: the cache does not grow with every path read
        del cache[full]
    if (stale or gone) and cache_path:
        _save_cache(cache_path, cache)
    whole = hashlib.sha256()
    for rel, full in files:
        whole.update(json.dumps([rel, stamps[full].st_size, cache[full][1]]).encode())
    return whole.hexdigest()[:DIGEST_CHARS]


def _files(path: str) -> list[tuple[str, str]]:
    """(name relative to ``path``, absolute path) of every regular file, sorted by name."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return [(os.path.basename(path), path)]
    out = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            full = os.path.join(root, name)
            if not name.startswith(".") and os.path.isfile(full):
                out.append((os.path.relpath(full, path), full))
    return sorted(out)


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _load_cache(cache_path: str | None) -> dict:
    if not cache_path or not os.path.exists(cache_path):
        return {}
    try:
        with open(cache_path) as f:
            return json.load(f)
    except (OSError, ValueError):  # a damaged cache costs a rehash, never a wrong digest
        return {}


def _save_cache(cache_path: str, cache: dict) -> None:
    """Written to a temporary file and renamed, so a killed run leaves the old cache whole."""
    folder = os.path.dirname(cache_path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, cache_path)
