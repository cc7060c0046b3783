"""Time reading a LLaVA-mix-sized ShareGPT file, and what a run pays for it.

Writes a synthetic calibration file of `--records` records (a share of them text-only, images
spread over `--images` small files), then times `data.read_sharegpt` (parse, skip text-only
records, check every image path) and reports the host memory the parsed records hold. A run
reads the file once into its shared stage cache (`sources.sharegpt_records`); before that,
`validate` and every stage read it again, and quantize and evaluate once per sweep method; a
line prints what that would cost for a run of `--methods` methods. Last, validate's two checks
of the records the default config draws (plus 256 held-out ones): decoding their images
(`data.image_sizes`, which names truncated files) and every prompt's length against
`data.max_length` (`sources.check_prompt_lengths`, with `--checkpoint`'s tokenizer and prompt
builder).

    python -m benchmarks.calib_read                      # 665,000 records (LLaVA mix665k's size)
    python -m benchmarks.calib_read --records 100000     # ShareGPT4V instruct's size
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from configs import common
from mode_jax.calib import data, sources
from mode_jax.convert import families, safetensors_io

# COCO-like (width, height) of the synthetic images, cycled
SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (640, 425), (500, 375), (640, 360),
         (612, 612))


def write_synthetic(directory: Path, records: int, images: int, text_only_every: int,
                    sizes=SIZES) -> Path:
    """`records` ShareGPT records over `images` blank images of `sizes` (cycled), every
    `text_only_every`-th record without one (0: none); returns the JSON's path."""
    (directory / "images").mkdir(parents=True)
    for i in range(images):
        w, h = sizes[i % len(sizes)]
        Image.new("RGB", (w, h)).save(directory / "images" / f"{i}.png")
    answer = "The image shows " + "a cat sitting on a mat next to a window and " * 8
    out = []
    for i in range(records):
        r = {"id": str(i), "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail, naming objects."},
            {"from": "gpt", "value": answer}]}
        if text_only_every <= 0 or i % text_only_every:
            r["image"] = f"{i % images}.png"
        out.append(r)
    path = directory / "mix.json"
    path.write_text(json.dumps(out))
    return path


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=665_000)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--text_only_every", type=int, default=8, help="every n-th record has no "
                   "image (0: none)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", type=int, default=6, help="sweep methods of the projected run")
    p.add_argument("--checkpoint", default="checkpoints/testbed", help="tokenizer and prompt "
                   "builder of validate's length check")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="calib_read_"))
    try:
        path = write_synthetic(tmp, args.records, args.images, args.text_only_every)
        print(f"{path.stat().st_size / 1e6:.0f} MB, {args.records} records")
        before = _rss_bytes()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            kept = data.read_sharegpt(str(path), str(tmp / "images"))
            times.append(time.perf_counter() - start)
            if len(times) == 1:
                held = _rss_bytes() - before  # the first read's records, still referenced
        print(f"read_sharegpt: {min(times):.2f} s (best of {args.repeats}), {len(kept)} image "
              f"records kept, about {held / 1e9:.2f} GB held (RSS difference)")
        reads = 3 + 2 * args.methods  # validate, calibrate, sensitivity; quantize + evaluate each
        print(f"a run of {args.methods} methods: {reads} reads ({reads * min(times):.0f} s) "
              f"before, 1 read ({min(times):.1f} s) now")
        _validate_checks(kept, tmp, args.checkpoint)
        print(f"reproduce: python -m benchmarks.calib_read {' '.join(sys.argv[1:])}".rstrip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _validate_checks(records: list[dict], directory: Path, checkpoint: str) -> None:
    cfg = common.get_config().data
    cfg.calib_json, cfg.image_dir = str(directory / "mix.json"), str(directory / "images")
    cfg.max_length = 1 << 20
    take = sources.DEFAULT_HELDOUT_CONVERSATIONS
    drawn = sources.drawn_indices(len(records), cfg, 0, take)
    raw = safetensors_io.read_config(checkpoint)
    model_config = families.for_model_type(raw["model_type"], checkpoint).config_from_json(
        raw, checkpoint)
    cache = {("sharegpt", cfg.calib_json, cfg.image_dir): records}
    sources.checkpoint_tokenizer(checkpoint, cache)  # loaded before the timing, as validate has
    start = time.perf_counter()
    sizes = data.image_sizes(records, cfg.image_dir, drawn)
    decode = time.perf_counter() - start
    start = time.perf_counter()
    sources.check_prompt_lengths(cfg, checkpoint, model_config, 0, take, sizes, cache)
    lengths = time.perf_counter() - start
    distinct = len({wh for per_record in sizes.values() for wh in per_record})
    print(f"validate on the default draws ({len(drawn)} records, {distinct} "
          f"image sizes; {checkpoint}): images decoded {decode:.2f} s, prompt lengths "
          f"{lengths:.2f} s")


if __name__ == "__main__":
    main()
