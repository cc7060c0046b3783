"""What grouping calibration samples by image grid saves: compiled programs and wall time.

A batch's image grids are static arguments of the compiled passes, so every new tuple of
grids in a batch is one more program to trace and compile. The calibration source groups the
draw by the grid each image gets (`data.group_by_image_grid` with `data.image_grids`); many
pixel sizes share a grid (Kimi-VL pads images to 28-pixel multiples: COCO's 640x421 to
640x448 are one grid). This script writes a ShareGPT file of `--records` records over
`--sizes` blank images of COCO-like sizes (`NEAR_SIZES`: 12 sizes, 5 grids at Kimi-VL's
settings; no text-only records), draws them with the seed, batches them with `--checkpoint`'s
tokenizer and image processor in three orders: drawn, grouped by pixel size and grouped by
grid; and prints for each: batches, distinct grid tuples, and the frequency pass over all
batches timed from a cold start (each order in its own process, so none reuses another's
programs), with the ratios. It also times `data.image_grids` (what grouping by grid costs) on
`--grid_sizes` seeded random sizes of 200 to 1400 px.

    python -m benchmarks.image_grouping      # the testbed, 256 records, 12 sizes: 8 minutes
    python -m benchmarks.image_grouping --records 64 --sizes 4
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

from benchmarks.calib_read import write_synthetic
from configs import common

# (width, height), COCO-like: landscape 640-wide sizes of four grids, portrait and 500-wide
# ones; at Kimi-VL's settings (patch 14, 2x2 merge, padded) they make 5 grids
NEAR_SIZES = ((640, 480), (640, 427), (480, 640), (640, 425), (640, 478), (427, 640),
              (640, 426), (500, 375), (640, 428), (425, 640), (500, 376), (640, 424))
ORDERS = ("drawn", "size", "grid")


def measure(checkpoint: str, calib_json: str, n: int, batch_size: int, order: str) -> dict:
    """One order's batches and its cold frequency pass (run in a fresh process)."""
    import mode_jax
    from mode_jax.calib import data, passes, sources

    cfg = common.get_config().data
    cfg.update(dict(source="sharegpt", calib_json=calib_json,
                    image_dir=str(Path(calib_json).parent / "images"), batch_size=batch_size,
                    max_length=0))
    if order == "drawn":  # grouping made a no-op
        data.group_by_image_grid = lambda samples, grid=None: list(samples)
    elif order == "size":  # no grid function: the pixel sizes are the keys
        data.image_grids = lambda build: None
    model = mode_jax.load(checkpoint)
    calib = sources.load(cfg, checkpoint, model.config, n, 0, "stats")
    grids = {tuple(map(tuple, np.asarray(b["image_grid_hws"]).tolist())) for b in calib.batches}
    scfg = passes.StatsConfig(calib.image_token_id, calib.special_token_ids)
    start = time.perf_counter()
    passes.frequency_pass(model, calib.batches, scfg)
    return {"batches": len(calib.batches), "grids": len(grids),
            "seconds": time.perf_counter() - start}


def grid_seconds(checkpoint: str, count: int) -> tuple[float, int]:
    """Seconds per size `data.image_grids` takes on `count` random sizes; sizes; grids."""
    import mode_jax
    from mode_jax.calib import data, sources

    config = mode_jax.load(checkpoint).config
    build = sources._builder(checkpoint, config, sources.checkpoint_tokenizer(checkpoint))
    rng = np.random.default_rng(0)
    sizes = {(int(w), int(h)) for w, h in rng.integers(200, 1400, (count, 2))}
    grid = data.image_grids(build)
    start = time.perf_counter()
    grids = {grid(size) for size in sizes}
    return (time.perf_counter() - start) / len(sizes), len(sizes), len(grids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/testbed")
    ap.add_argument("--records", type=int, default=256)
    ap.add_argument("--sizes", type=int, default=len(NEAR_SIZES),
                    choices=range(1, len(NEAR_SIZES) + 1))
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--grid_sizes", type=int, default=400)
    ap.add_argument("--one", choices=ORDERS, help=argparse.SUPPRESS)
    ap.add_argument("--calib_json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # the child process of one order
        print(json.dumps(measure(args.checkpoint, args.calib_json, args.records,
                                 args.batch_size, args.one)))
        return
    print("command: python -m benchmarks.image_grouping " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        calib_json = str(write_synthetic(Path(tmp), args.records, args.sizes, text_only_every=0,
                                         sizes=NEAR_SIZES))
        got = {}
        for order in ORDERS:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.image_grouping", "--one", order,
                 "--calib_json", calib_json, "--checkpoint", args.checkpoint,
                 "--records", str(args.records), "--batch_size", str(args.batch_size)],
                capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            got[order] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.records} records, {args.sizes} image sizes "
          f"({', '.join(f'{w}x{h}' for w, h in NEAR_SIZES[:args.sizes])}), "
          f"batch {args.batch_size}, {args.checkpoint}")
    print(f"{'grouped by':<10} {'batches':>7} {'grid tuples':>11} {'frequency pass (cold)':>22}")
    for order, r in got.items():
        print(f"{order:<10} {r['batches']:>7} {r['grids']:>11} {r['seconds']:>20.1f} s")
    for order in ORDERS[1:]:
        print(f"{order} / drawn: {got[order]['grids'] / got['drawn']['grids']:.2f}x the "
              f"programs, {got['drawn']['seconds'] / got[order]['seconds']:.2f}x faster")
    print(f"grid / size: {got['grid']['grids'] / got['size']['grids']:.2f}x the programs, "
          f"{got['size']['seconds'] / got['grid']['seconds']:.2f}x faster")
    per_size, sizes, grids = grid_seconds(args.checkpoint, args.grid_sizes)
    print(f"data.image_grids: {per_size * 1e3:.1f} ms a size ({sizes} sizes of 200 to 1400 px, "
          f"{grids} grids)")


if __name__ == "__main__":
    main()
