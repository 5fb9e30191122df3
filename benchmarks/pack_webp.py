"""Repack a Parquet image dataset's training split as WebP images, small enough to carry to a GPU machine (64 MiB).

Lossless by default (about 20 % smaller than PNG, pixel-identical: asserted image by image). `--quality Q` re-encodes
lossy instead, for a source already stored as lossy WebP whose training split is itself near the limit; it prints the
mean absolute pixel change it made.

    python benchmarks/pack_webp.py ../shared/data/tiny_imagenet_32 .gpu/tin_train_webp.parquet
    python benchmarks/pack_webp.py ../shared/data/tiny_imagenet_32_full .gpu/tin_full_train_q80.parquet --quality 80
      # 99,953 images: 63.5 MiB as stored (WebP q90) -> about 43 MiB, mean |change| about 4 of 255 per pixel
"""

import argparse
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encode(image: Image.Image, quality: int | None) -> bytes:
    buffer = io.BytesIO()
    if quality is None:
        image.save(buffer, "WEBP", lossless=True, quality=100, method=4)
    else:
        image.save(buffer, "WEBP", quality=quality, method=6)
    return buffer.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a Parquet dataset folder with train*.parquet (columns image, label)")
    parser.add_argument("destination", help="the packed Parquet file to write (columns webp, label)")
    parser.add_argument("--quality", type=int, choices=range(1, 101), metavar="1-100",
                        help="lossy WebP at this quality instead of lossless")
    args = parser.parse_args()
    shards = sorted(Path(args.source).glob("train*.parquet"))
    if not shards:
        parser.error(f"no train*.parquet in {args.source}")
    table = pa.concat_tables([pq.read_table(path) for path in shards])
    packed, change = [], 0.0
    for record in table.column("image").to_pylist():
        image = Image.open(io.BytesIO(record["bytes"])).convert("RGB")
        packed.append(encode(image, args.quality))
        decoded = np.asarray(Image.open(io.BytesIO(packed[-1])).convert("RGB"), dtype=np.int16)
        difference = np.abs(decoded - np.asarray(image, dtype=np.int16)).mean()
        assert args.quality is not None or difference == 0, "lossless WebP changed a pixel"
        change += difference
    out = pa.table({"webp": pa.array(packed, pa.binary()), "label": table.column("label")})
    Path(args.destination).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, args.destination, compression="none")
    print(f"{len(packed)} images -> {args.destination} ({Path(args.destination).stat().st_size / 2**20:.1f} MiB), "
          f"mean |pixel change| {change / len(packed):.2f} of 255")


if __name__ == "__main__":
    main()
