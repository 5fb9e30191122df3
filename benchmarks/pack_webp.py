"""Repack a Parquet image dataset with lossless WebP images (about 20 % smaller than PNG, pixel-identical).

Used to carry Tiny ImageNet's training split to a GPU machine whose upload limit is below its PNG size:
    python benchmarks/pack_webp.py ../shared/data/tiny_imagenet_32 .gpu/tin_train_webp.parquet
"""

import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def main(source: str, destination: str) -> None:
    tables = [pq.read_table(path) for path in sorted(Path(source).glob("train*.parquet"))]
    table = pa.concat_tables(tables)
    packed = []
    for record in table.column("image").to_pylist():
        image = Image.open(io.BytesIO(record["bytes"])).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "WEBP", lossless=True, quality=100, method=4)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")), np.asarray(image))
        packed.append(buffer.getvalue())
    out = pa.table({"webp": pa.array(packed, pa.binary()), "label": table.column("label")})
    pq.write_table(out, destination, compression="none")
    print(f"{len(packed)} images -> {destination} ({Path(destination).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
