"""The GPU session's data path: pack_webp.py repacks a Parquet training split, meta_train_tensors.py reads it back."""

import io
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_examples import BENCHMARKS, load_script

pack_webp = load_script("pack_webp", BENCHMARKS)
meta_train_tensors = load_script("meta_train_tensors", BENCHMARKS)


def write_png_split(folder, count=6):
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    images = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    folder.mkdir()
    pq.write_table(pa.table({"image": images, "label": list(range(count))}), folder / "train-00000.parquet")
    return pixels


def pack(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["pack_webp.py", *map(str, argv)])
    pack_webp.main()


def test_lossless_pack_reads_back_pixel_for_pixel(tmp_path, monkeypatch):
    pixels = write_png_split(tmp_path / "source")
    pack(monkeypatch, tmp_path / "source", tmp_path / "packed.parquet")
    tensors = meta_train_tensors.load_packed(str(tmp_path / "packed.parquet"))
    assert torch.equal(tensors.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert tensors.labels.tolist() == list(range(6)) and len(tensors.class_names) == 6


def test_lossy_pack_is_smaller_and_reports_its_change(tmp_path, monkeypatch, capsys):
    write_png_split(tmp_path / "source")
    pack(monkeypatch, tmp_path / "source", tmp_path / "lossless.parquet")
    pack(monkeypatch, tmp_path / "source", tmp_path / "lossy.parquet", "--quality", 50)
    lossless, lossy = (pq.read_table(tmp_path / name).column("webp").to_pylist()
                       for name in ("lossless.parquet", "lossy.parquet"))
    assert sum(map(len, lossy)) < sum(map(len, lossless))
    changes = [float(line.rsplit("change| ", 1)[1].split()[0]) for line in capsys.readouterr().out.splitlines()]
    assert changes[0] == 0.0 and changes[1] > 0.0


def test_pack_names_a_folder_without_a_training_split(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        pack(monkeypatch, tmp_path / "empty", tmp_path / "out.parquet")
    assert "no train*.parquet in" in capsys.readouterr().err
