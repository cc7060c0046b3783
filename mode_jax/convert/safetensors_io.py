"""Read a Hugging Face checkpoint directory without PyTorch: config.json and safetensors shards.

`iter_tensors(directory)` yields `(name, numpy array)` one tensor at a time, shard after shard,
reading only that tensor's bytes (`np.fromfile` at its offset), so peak memory is the converted
model plus one tensor. bf16 and fp8 stay as they are stored (numpy dtypes from ml_dtypes).

The safetensors layout: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data;
offsets count from the end of the header.

Shards come from `model.safetensors.index.json` (`weight_map`: tensor name -> shard file) when
present, else from the single `*.safetensors` file. Every problem raises one error naming the
file (and tensor) at fault.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from mode_jax.convert import mapping

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


def checkpoint_dir(path: str | Path) -> Path:
    """`path` as a Path, after checking that it is an existing directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory {p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"checkpoint path {p} is a file; pass its directory")
    return p


def read_json(file: Path) -> dict[str, Any]:
    try:
        with open(file) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's `config.json` as a dict."""
    file = checkpoint_dir(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found: a checkpoint directory needs the model's config.json"
        )
    return read_json(file)


def shard_map(path: str | Path) -> dict[Path, list[str] | None]:
    """Shard file -> the tensor names the index assigns to it (None: take every tensor).

    Raises FileNotFoundError naming the index and the shard when a listed shard is missing.
    """
    d = checkpoint_dir(path)
    index = d / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no 'weight_map' (tensor name -> shard file)")
        shards: dict[Path, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(d / shard, []).append(name)
        missing = [s for s in shards if not s.is_file()]
        if missing:
            listed = ", ".join(f"{s.name} ({len(shards[s])} tensors, e.g. {shards[s][0]})"
                               for s in missing)
            raise FileNotFoundError(f"{index} names shard(s) missing from {d}: {listed}")
        return dict(shards)
    files = sorted(d.glob("*.safetensors"))
    if len(files) == 1:
        return {files[0]: None}
    if not files:
        extra = " (PyTorch .bin weights are not supported)" if list(d.glob("*.bin")) else ""
        raise FileNotFoundError(f"no *.safetensors weights in {d}{extra}")
    raise FileNotFoundError(
        f"{d} holds {len(files)} safetensors files but no {INDEX_NAME} saying which tensor "
        f"is where: {', '.join(f.name for f in files)}"
    )


def read_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """`({name: {"dtype", "shape", "data_offsets"}}, data start byte)` of one shard."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{file} is truncated or not safetensors: header of {n} bytes "
                             f"in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{file}: unreadable safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header is a JSON {type(header).__name__}, not an "
                         "object of tensors")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not _well_formed(info):
            raise ValueError(f"{file}: tensor {name}'s header entry {info!r} lacks a dtype, a "
                             "shape of non-negative ints or data_offsets [begin, end]")
        begin, end = info["data_offsets"]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}; "
                             f"supported: {sorted(_DTYPES)}")
        nbytes = int(np.prod(info["shape"], dtype=np.int64)) * _DTYPES[info["dtype"]].itemsize
        if end - begin != nbytes or 8 + n + end > size:
            raise ValueError(f"{file}: tensor {name} data [{begin}, {end}) does not fit its "
                             f"shape {info['shape']} {info['dtype']} or the file ({size} bytes)")
    return header, 8 + n


def _well_formed(info: Any) -> bool:
    def ints(x, n=None):
        return (isinstance(x, list) and (n is None or len(x) == n) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x))
    return (isinstance(info, dict) and isinstance(info.get("dtype"), str)
            and ints(info.get("shape")) and ints(info.get("data_offsets"), 2))


def iter_shard(file: Path, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Tensors of one shard in file order (only `names` when given), read one at a time."""
    header, start = read_header(file)
    if names is not None:
        absent = [k for k in names if k not in header]
        if absent:
            raise ValueError(f"{file.name} lacks {len(absent)} tensor(s) its index assigns to it: "
                           + ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else ""))
        wanted = set(names)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    for name in order:
        if names is not None and name not in wanted:
            continue
        info = header[name]
        dtype = _DTYPES[info["dtype"]]
        count = int(np.prod(info["shape"], dtype=np.int64))
        array = np.fromfile(file, dtype=dtype, count=count,
                            offset=start + info["data_offsets"][0])
        yield name, array.reshape(info["shape"])
        del array  # before the next read: a held reference would keep two tensors alive


def iter_tensors(path: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the checkpoint in `path`, shard by shard."""
    for file, names in shard_map(path).items():
        yield from iter_shard(file, names)


def checkpoint_nbytes(path: str | Path) -> int:
    """Total size of the checkpoint's weight files in bytes."""
    return sum(f.stat().st_size for f in shard_map(path))


def convert_directory(path: str | Path, rules, abstract_model, ignore=(), rename=None):
    """Stream the checkpoint at `path` through `mapping.convert` (one tensor at a time); a
    missing shard fails before any work, and a mismatch names the directory. `rename(name)`
    maps an older file layout's names onto the ones the rules expect."""
    shard_map(path)
    tensors = iter_tensors(path)
    if rename is not None:
        tensors = ((rename(name), array) for name, array in tensors)
    try:
        return mapping.convert(tensors, rules, abstract_model, ignore=ignore)
    except mapping.MappingError as err:
        raise mapping.MappingError(f"{path}: {err}") from None
