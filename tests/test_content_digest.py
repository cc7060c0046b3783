"""Content digests: keyed by bytes, not path or time; cached per file by (size, mtime, inode)."""

import hashlib
import json
import os
import shutil

import pytest

from mode_jax import content_digest


def _checkpoint(root, weights=b"\x01" * 1000):
    os.makedirs(root / "sub", exist_ok=True)
    (root / "config.json").write_text('{"model_type": "x"}')
    (root / "model.safetensors").write_bytes(weights)
    (root / "sub" / "tokenizer.json").write_text("{}")
    (root / ".cache").mkdir(exist_ok=True)
    (root / ".cache" / "lock").write_text("ignored")
    return root


def _brute_force(root):
    """Independent restatement: sha256 over [relative name, size, file sha256] in name order."""
    h = hashlib.sha256()
    for rel in sorted(["config.json", "model.safetensors", os.path.join("sub", "tokenizer.json")]):
        data = (root / rel).read_bytes()
        h.update(f'["{rel}", {len(data)}, "{hashlib.sha256(data).hexdigest()}"]'.encode())
    return h.hexdigest()[:16]


def test_digest_is_the_content_of_the_files_not_their_place_or_time(tmp_path):
    a = _checkpoint(tmp_path / "a")
    d = content_digest.digest(str(a))
    assert d == _brute_force(a)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)  # new path, new mtimes
    os.utime(b / "model.safetensors", ns=(1, 1))
    assert content_digest.digest(str(b)) == d
    (b / ".cache" / "lock").write_text("changed")  # hidden: not read by a loader
    assert content_digest.digest(str(b)) == d
    (b / "model.safetensors").write_bytes(b"\x02" + b"\x01" * 999)  # same size, one byte
    assert content_digest.digest(str(b)) != d
    (b / "extra.bin").write_bytes(b"")
    assert content_digest.digest(str(a)) == d != content_digest.digest(str(b))


def test_a_single_file_and_a_missing_path(tmp_path):
    f = tmp_path / "calib.json"
    f.write_text("[]")
    h = hashlib.sha256(f'["calib.json", 2, "{hashlib.sha256(b"[]").hexdigest()}"]'.encode())
    assert content_digest.digest(str(f)) == h.hexdigest()[:16]
    with pytest.raises(FileNotFoundError, match="nope.json"):
        content_digest.digest(str(tmp_path / "nope.json"))


def test_cache_skips_unchanged_files_and_rehashes_rewritten_ones(tmp_path, monkeypatch):
    root = _checkpoint(tmp_path / "ckpt")
    cache = str(tmp_path / "work" / "digests.json")
    first = content_digest.digest(str(root), cache)
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, *a: reads.append(f.name) or real(f, *a))
    assert content_digest.digest(str(root), cache) == first and reads == []  # stat only
    os.utime(root / "config.json")  # touched, same bytes: hashed again, same digest
    assert content_digest.digest(str(root), cache) == first
    assert reads == [str(root / "config.json")]
    (root / "model.safetensors").write_bytes(b"\x03" * 1000)  # rewritten in place
    assert content_digest.digest(str(root), cache) == content_digest.digest(str(root)) != first


def test_cache_drops_the_files_that_are_gone(tmp_path):
    """A calibration file read once and deleted, a checkpoint moved: their entries go at the
    next digest, whichever path it reads; the files that remain keep theirs."""
    root = _checkpoint(tmp_path / "ckpt")
    other = tmp_path / "calib.json"
    other.write_text("[]")
    cache = tmp_path / "work" / "digests.json"
    content_digest.digest(str(root), str(cache))
    content_digest.digest(str(other), str(cache))
    files = [str(root / n) for n in ("config.json", "model.safetensors", "sub/tokenizer.json")]
    assert sorted(json.loads(cache.read_text())) == sorted([str(other), *files])
    other.unlink()
    (root / "sub" / "tokenizer.json").rename(tmp_path / "tokenizer.json")
    content_digest.digest(str(root), str(cache))
    assert sorted(json.loads(cache.read_text())) == sorted(files[:2])


def test_a_damaged_cache_costs_a_rehash_not_a_wrong_digest(tmp_path):
    root = _checkpoint(tmp_path / "ckpt")
    cache = tmp_path / "digests.json"
    cache.write_text("{not json")
    assert content_digest.digest(str(root), str(cache)) == _brute_force(root)
