"""The bit map artifact: per-expert bit-widths of the routed experts, for code and for people.

A directory holds
- `bits.npy`: [L_moe, E] int32, what the quantize stage reads;
- `bitmap.json`: `{layer: {expert: bits}}` (string keys, layer = index of the MoE layer unless
  `layer_ids` names them, e.g. decoder-layer numbers);
- `summary.json`: average bits overall and per layer, histogram, plus any solver report;
- `bitmap.png`: heat map of bits by layer and expert.
`load` reads `bits.npy` and refuses a `bitmap.json` that disagrees with it (a hand edit).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BITS_FILE, JSON_FILE, SUMMARY_FILE, FIGURE_FILE = (
    "bits.npy",
    "bitmap.json",
    "summary.json",
    "bitmap.png",
)


def to_json(bits, layer_ids=None) -> dict:
    """`{layer: {expert: bits}}` with string keys, as JSON writes them."""
    arr = _check(bits)
    ids = _layer_ids(arr, layer_ids)
    return {str(ids[l]): {str(e): int(b) for e, b in enumerate(row)} for l, row in enumerate(arr)}


def from_json(table: dict) -> tuple[np.ndarray, list[int]]:
    """Inverse of `to_json`: (bits [L, E] int32, layer ids) from `{layer: {expert: bits}}`."""
    try:
        layers = sorted(table, key=int)
        rows = [table[k] for k in layers]
        num_experts = len(rows[0]) if rows else 0
        arr = np.array(
            [[int(row[str(e)]) for e in range(num_experts)] for row in rows], dtype=np.int32
        )
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(
            f"bit map table is not {{layer: {{expert: bits}}}} with experts 0..E-1: {err!r}"
        ) from None
    if any(len(row) != num_experts for row in rows):
        raise ValueError("bit map table: every layer must list the same experts 0..E-1")
    return _check(arr), [int(k) for k in layers]


def summary(bits, candidate_bits=None) -> dict:
    """Average bits overall and per layer, and the histogram of bit-widths (counts)."""
    arr = _check(bits)
    return {
        "num_layers": int(arr.shape[0]),
        "num_experts": int(arr.shape[1]),
        "average_bits": float(arr.mean()),
        "total_bits": int(arr.sum()),
        "per_layer_average_bits": [float(v) for v in arr.mean(axis=1)],
        "histogram": {str(b): int((arr == b).sum()) for b in _levels(arr, candidate_bits)},
    }


def save(directory, bits, *, candidate_bits=None, layer_ids=None, report=None, figure=True) -> Path:
    """Write the artifact files into `directory` (created); returns its path.

    report: optional JSON-ready dict (e.g. `Allocation.report()`) stored in summary.json.
    """
    arr = _check(bits)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / BITS_FILE, arr)
    (out / JSON_FILE).write_text(json.dumps(to_json(arr, layer_ids), indent=1))
    info = summary(arr, candidate_bits)
    info["layer_ids"] = _layer_ids(arr, layer_ids)
    if candidate_bits is not None:
        info["candidate_bits"] = [int(b) for b in candidate_bits]
    if report is not None:
        info["report"] = report
    (out / SUMMARY_FILE).write_text(json.dumps(info, indent=1))
    if figure:
        heatmap(arr, out / FIGURE_FILE, layer_ids=layer_ids, candidate_bits=candidate_bits)
    return out


def load(directory) -> tuple[np.ndarray, list[int]]:
    """(bits [L, E] int32, layer ids) from a directory written by `save`."""
    path = Path(directory)
    if not (path / BITS_FILE).is_file():
        raise FileNotFoundError(f"no bit map at {path / BITS_FILE}")
    arr = _check(np.load(path / BITS_FILE))
    ids = list(range(arr.shape[0]))
    if (path / JSON_FILE).is_file():
        table_bits, ids = from_json(json.loads((path / JSON_FILE).read_text()))
        if table_bits.shape != arr.shape or np.any(table_bits != arr):
            diff = np.argwhere(table_bits != arr) if table_bits.shape == arr.shape else None
            where = f" first at [layer, expert] = {diff[0].tolist()}" if diff is not None else ""
            raise ValueError(
                f"{path / JSON_FILE} disagrees with {path / BITS_FILE}{where}; "
                f"edit both or regenerate the bit map"
            )
    return arr, ids


def heatmap(bits, path, *, layer_ids=None, candidate_bits=None, title="bits per routed expert"):
    """Save a heat map (layers down, experts across) with one colour per bit-width."""
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    arr = _check(bits)
    levels = _levels(arr, candidate_bits)
    mids = np.asarray(levels, dtype=np.float64)
    edges = np.concatenate([[mids[0] - 0.5], (mids[1:] + mids[:-1]) / 2, [mids[-1] + 0.5]])
    colours = colormaps["viridis"].resampled(len(levels))
    fig = Figure(figsize=(max(4.0, arr.shape[1] * 0.12 + 2), max(3.0, arr.shape[0] * 0.22 + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(
        arr,
        aspect="auto",
        interpolation="nearest",
        cmap=colours,
        norm=BoundaryNorm(edges, len(levels)),
    )
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ids = _layer_ids(arr, layer_ids)
    step = max(1, len(ids) // 26)
    ax.set_yticks(range(0, len(ids), step), [str(i) for i in ids[::step]])
    ax.set_title(f"{title} (average {arr.mean():.3f})")
    fig.colorbar(image, ax=ax, ticks=levels, label="bits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def _levels(arr: np.ndarray, candidate_bits) -> list[int]:
    """Bit-widths present in the map, plus the candidates (so empty levels still show)."""
    extra = () if candidate_bits is None else np.asarray(candidate_bits).ravel()
    return sorted({int(b) for b in np.unique(arr)} | {int(b) for b in extra})


def _check(bits) -> np.ndarray:
    arr = np.asarray(bits)
    if arr.ndim != 2 or 0 in arr.shape:
        raise ValueError(f"bit map has shape {arr.shape}; expected [layers, experts]")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or np.any(arr != np.round(arr)):
            raise ValueError(f"bit map must hold integers, got dtype {arr.dtype}")
    if np.any(arr < 1):
        raise ValueError("bit map entries must be positive bit-widths")
    return arr.astype(np.int32)


def _layer_ids(arr: np.ndarray, layer_ids) -> list[int]:
    if layer_ids is None:
        return list(range(arr.shape[0]))
    ids = [int(i) for i in layer_ids]
    if len(ids) != arr.shape[0] or np.any(np.diff(ids) <= 0):
        raise ValueError(f"layer_ids {ids} must name {arr.shape[0]} layers in increasing order")
    return ids
