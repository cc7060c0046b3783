"""Atomic stage artifacts: arrays through Orbax, metadata as JSON, one directory per artifact.

An artifact directory exists only when it is complete: everything is written into a hidden
sibling first and renamed into place last, so a process killed mid-write leaves no partial
artifact behind (only a `.tmp-*` directory that the next run removes).

In a multi-process run each process reads and writes alone (`_checkpointer`): the callers
hand over host arrays, and only process 0 saves (mode_jax.multihost).

Layout of an artifact directory:
  arrays/     Orbax StandardCheckpointer tree of the non-empty arrays (absent if none)
  meta.json   {"meta": <caller's JSON>, "empty": {"a/b": [shape, dtype]}}  (written last)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

META = "meta.json"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a/b": leaf} of a nested dict: the names an artifact's arrays are stored under."""
    out = {}
    for key, value in tree.items():
        if not isinstance(key, str) or "/" in key:
            raise ValueError(f"artifact keys must be strings without '/': got {key!r}")
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "/"))
        else:
            out[path] = value
    return out


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: by default Orbax makes every process of a
    `jax.distributed` job take part in each save and restore, and ours are done by one."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}"))


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def save(path: str, arrays: dict, meta: dict) -> None:
    """Write `arrays` (nested dict of arrays) and `meta` (JSON-able) atomically to `path`."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:8]}")
    flat = {k: np.asarray(v) if not hasattr(v, "dtype") else v for k, v in flatten(arrays).items()}
    empty = {k: [list(v.shape), str(v.dtype)] for k, v in flat.items() if v.size == 0}
    full = {k: v for k, v in flat.items() if v.size > 0}
    os.makedirs(tmp)
    try:
        if full:
            ckptr = _checkpointer()
            ckptr.save(os.path.join(tmp, "arrays"), _unflatten(full))
            ckptr.wait_until_finished()
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({"meta": meta, "empty": empty}, f, indent=1, sort_keys=True)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load(path: str) -> tuple[dict, dict]:
    """Return (arrays, meta) of a complete artifact; arrays come back as numpy."""
    if not is_complete(path):
        raise FileNotFoundError(f"no complete artifact at {path}")
    with open(os.path.join(path, META)) as f:
        doc = json.load(f)
    flat: dict[str, Any] = {}
    arrays_dir = os.path.join(os.path.abspath(path), "arrays")  # orbax wants absolute paths
    if os.path.isdir(arrays_dir):
        restored = _checkpointer().restore(arrays_dir)
        flat.update({k: np.asarray(v) for k, v in flatten(restored).items()})
    for key, (shape, dtype) in doc["empty"].items():
        flat[key] = np.zeros(shape, dtype=_dtype(dtype))
    return _unflatten(flat), doc["meta"]


def _dtype(name: str) -> np.dtype:
    return np.dtype(getattr(ml_dtypes, name, name))


def remove_stale_tmp(parent: str) -> None:
    """Delete `.tmp-*` leftovers of a killed writer under `parent`."""
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
