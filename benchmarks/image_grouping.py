"""What grouping calibration samples by image size saves: compiled programs and wall time.

A batch's image grids are static arguments of the compiled passes, so every new tuple of
grids in a batch is one more program to trace and compile. The calibration source groups the
draw by image size (`data.group_by_image_size`). This script writes a ShareGPT file of
`--records` records over `--sizes` images of COCO-like sizes (`benchmarks.calib_read`'s
synthetic mix, no text-only records), draws them with the seed, batches them with
`--checkpoint`'s tokenizer and image processor in the drawn order and grouped, and prints for
each: batches, distinct grid tuples, and the frequency pass over all batches timed from a cold
start (each order in its own process, so neither reuses the other's programs), with the ratio.

    python -m benchmarks.image_grouping                   # the testbed, 64 records, 4 sizes
    python -m benchmarks.image_grouping --records 128 --sizes 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.calib_read import SIZES, write_synthetic
from configs import common


def measure(checkpoint: str, calib_json: str, n: int, batch_size: int, grouped: bool) -> dict:
    """One order's batches and its cold frequency pass (run in a fresh process)."""
    import mode_jax
    from mode_jax.calib import data, passes, sources

    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=calib_json,
                    image_dir=str(Path(calib_json).parent / "images"), batch_size=batch_size,
                    max_length=0))
    if not grouped:  # the draw's own order: grouping made a no-op
        data.group_by_image_size = list
    model = mode_jax.load(checkpoint)
    calib = sources.load(cfg, checkpoint, model.config, n, 0, "stats")
    grids = {tuple(map(tuple, np.asarray(b["image_grid_hws"]).tolist())) for b in calib.batches}
    scfg = passes.StatsConfig(calib.image_token_id, calib.special_token_ids)
    start = time.perf_counter()
    passes.frequency_pass(model, calib.batches, scfg)
    return {"batches": len(calib.batches), "grids": len(grids),
            "seconds": time.perf_counter() - start}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/testbed")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--sizes", type=int, default=4, choices=range(1, len(SIZES) + 1))
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--one", choices=("drawn", "grouped"), help=argparse.SUPPRESS)
    ap.add_argument("--calib_json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # the child process of one order
        print(json.dumps(measure(args.checkpoint, args.calib_json, args.records,
                                 args.batch_size, args.one == "grouped")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        calib_json = str(write_synthetic(Path(tmp), args.records, args.sizes, text_only_every=0))
        got = {}
        for order in ("drawn", "grouped"):
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.image_grouping", "--one", order,
                 "--calib_json", calib_json, "--checkpoint", args.checkpoint,
                 "--records", str(args.records), "--batch_size", str(args.batch_size)],
                capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            got[order] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.records} records, {args.sizes} image sizes "
          f"({', '.join(f'{w}x{h}' for w, h in SIZES[:args.sizes])}), batch {args.batch_size}, "
          f"{args.checkpoint}")
    print(f"{'order':<8} {'batches':>7} {'grid tuples':>11} {'frequency pass (cold)':>22}")
    for order, r in got.items():
        print(f"{order:<8} {r['batches']:>7} {r['grids']:>11} {r['seconds']:>20.1f} s")
    print(f"grouped / drawn: {got['grouped']['grids'] / got['drawn']['grids']:.2f}x the "
          f"programs, {got['drawn']['seconds'] / got['grouped']['seconds']:.2f}x faster")


if __name__ == "__main__":
    main()
