"""Small real image datasets built in tmp dirs, for the data and task tests (never the network)."""

import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from metaperturb_hf.data import ImageTensors

SHARED = Path(os.environ.get("METAPERTURB_SHARED", Path(__file__).resolve().parents[2] / "shared"))
CUB = SHARED / "data" / "cub200_2011_first50_32"


@pytest.fixture
def isolated_hf_cache(tmp_path, monkeypatch):
    """Keep `load_dataset`'s Arrow cache inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def random_pixels(count: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def image_dataset(num_classes: int = 12, per_class: int = 10, size: int = 32, seed: int = 0) -> datasets.Dataset:
    """Random RGB images (PNG-encoded by the `Image` feature) with a `ClassLabel` column."""
    pixels = random_pixels(num_classes * per_class, size, seed)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"class_{c}" for c in range(num_classes)])}
    )
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p) for p in pixels], "label": labels}, features=features
    )


def write_imagefolder(root: Path, num_classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    """One subfolder of PNG files per class, as `load_dataset("imagefolder")` expects."""
    pixels = random_pixels(num_classes * per_class, size)
    for i, p in enumerate(pixels):
        folder = root / f"class_{i // per_class}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(p).save(folder / f"{i}.png")
    return root


def identified_tensors(class_sizes: list[int], size: int = 8) -> ImageTensors:
    """Random images whose first two pixels encode their row index, so a subset's rows can be traced back."""
    labels = torch.tensor([c for c, n in enumerate(class_sizes) for _ in range(n)])
    images = torch.from_numpy(random_pixels(len(labels), size)).permute(0, 3, 1, 2).contiguous()
    rows = torch.arange(len(labels))
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (rows // 256).to(torch.uint8), (rows % 256).to(torch.uint8)
    return ImageTensors(images, labels, [f"class_{c}" for c in range(len(class_sizes))])


def row_ids(tensors: ImageTensors) -> list[int]:
    """The row indices encoded by `identified_tensors`."""
    return (tensors.images[:, 0, 0, 0].long() * 256 + tensors.images[:, 0, 0, 1].long()).tolist()
