"""Loading, decoding, subsampling, augmentation and resumable batches of image-classification data."""

import datasets
import pytest
import torch
from conftest_data import (
    CUB,
    identified_tensors,
    image_dataset,
    isolated_hf_cache,  # noqa: F401  (fixture)
    random_pixels,
    row_ids,
    write_imagefolder,
)
from PIL import Image

from metaperturb_hf.data import (
    BatchSampler,
    augment,
    load_image_dataset,
    normalize,
    subsample_per_class,
    to_tensors,
)

pytestmark = pytest.mark.usefixtures("isolated_hf_cache")


@pytest.fixture
def parquet_dir(tmp_path):
    image_dataset(num_classes=3, per_class=4).to_parquet(str(tmp_path / "train.parquet"))
    image_dataset(num_classes=3, per_class=2, seed=1).to_parquet(str(tmp_path / "test.parquet"))
    return tmp_path


# --- loading -----------------------------------------------------------------------------------


def test_parquet_folder_gives_the_named_split(parquet_dir):
    assert load_image_dataset(parquet_dir).num_rows == 12
    assert load_image_dataset(str(parquet_dir), split="test").num_rows == 6


@pytest.mark.parametrize("source", ["source.parquet", "*.parquet", "."])
def test_parquet_file_glob_and_custom_split_name(tmp_path, source):
    image_dataset(num_classes=2, per_class=3).to_parquet(str(tmp_path / "source.parquet"))
    dataset = load_image_dataset(str(tmp_path / source), split="source")
    assert dataset.num_rows == 6
    assert dataset.features["label"].names == ["class_0", "class_1"]


def test_missing_split_lists_the_available_ones(parquet_dir):
    with pytest.raises(ValueError, match=r"No split 'validation'; available splits: \['test', 'train'\]"):
        load_image_dataset(parquet_dir, split="validation")


def test_dataset_and_dataset_dict_sources():
    train, test = image_dataset(2, 2), image_dataset(2, 1)
    splits = datasets.DatasetDict({"train": train, "test": test})
    assert load_image_dataset(train) is train
    assert load_image_dataset(splits, split="test") is test
    with pytest.raises(ValueError, match=r"No split 'valid'; available splits: \['test', 'train'\]"):
        load_image_dataset(splits, split="valid")


def test_imagefolder(tmp_path):
    dataset = load_image_dataset(write_imagefolder(tmp_path / "folder", num_classes=3, per_class=4))
    tensors = to_tensors(dataset)
    assert tensors.images.shape == (12, 3, 32, 32)
    assert tensors.class_names == ["class_0", "class_1", "class_2"]
    assert torch.bincount(tensors.labels).tolist() == [4, 4, 4]


def test_cub_first50_train_split():
    if not CUB.is_dir():
        pytest.skip(f"CUB reference data not at {CUB} (set METAPERTURB_SHARED to ../shared)")
    tensors = to_tensors(load_image_dataset(CUB, split="train"))
    assert tensors.images.shape == (1500, 3, 32, 32) and tensors.images.dtype == torch.uint8
    assert len(tensors.class_names) == 50 and len(torch.unique(tensors.labels)) == 50


# --- column validation -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["image", "label"])
def test_missing_column_names_it_and_the_option(kind):
    message = rf"no {kind} column 'nope'; its columns are \['image', 'label'\].*{kind}_column=.*--{kind}-column"
    with pytest.raises(ValueError, match=message):
        load_image_dataset(image_dataset(2, 1), **{f"{kind}_column": "nope"})


@pytest.mark.parametrize("column", ["caption", "label"])
def test_non_image_column_is_rejected(column):
    dataset = image_dataset(2, 1).add_column("caption", ["a", "b"])
    with pytest.raises(ValueError, match=rf"Column '{column}' holds .*, not images.*--image-column"):
        to_tensors(dataset, image_column=column)


def test_string_labels_suggest_class_encode_column():
    dataset = image_dataset(2, 1).add_column("species", ["cat", "dog"])
    with pytest.raises(ValueError, match=r"holds strings.*dataset.class_encode_column\('species'\)"):
        to_tensors(dataset, label_column="species")


def test_float_labels_are_rejected():
    dataset = image_dataset(2, 1).add_column("score", [0.5, 1.5])
    with pytest.raises(ValueError, match=r"'score' holds .*float.*not integer class ids"):
        to_tensors(dataset, label_column="score")


def test_columns_are_checked_before_any_decoding():
    broken = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not a png", "path": None}], "y": [0]},
        features=datasets.Features({"image": datasets.Image(), "y": datasets.Value("int64")}),
    )
    with pytest.raises(ValueError, match="no label column 'label'"):
        to_tensors(broken)


# --- decoding ----------------------------------------------------------------------------------


def test_to_tensors_decodes_pixels_exactly():
    tensors = to_tensors(image_dataset(num_classes=3, per_class=2, size=8))
    assert tensors.images.dtype == torch.uint8 and tensors.labels.dtype == torch.int64
    expected = torch.from_numpy(random_pixels(6, size=8)).permute(0, 3, 1, 2)
    assert torch.equal(tensors.images, expected)
    assert tensors.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_integer_labels_get_their_ids_as_names():
    dataset = image_dataset(2, 2).cast_column("label", datasets.Value("int32"))
    tensors = to_tensors(dataset)
    assert tensors.class_names == ["0", "1"] and tensors.labels.dtype == torch.int64


def _mixed_sizes_dataset():
    images = [Image.new("RGB", (32, 32), (10, 20, 30)), Image.new("RGB", (40, 24), (10, 20, 30))]
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1]}).cast_column("image", datasets.Image())


def test_different_sizes_need_image_size():
    with pytest.raises(ValueError, match=r"images have different sizes \(32x32 and 40x24.*pass image_size"):
        to_tensors(_mixed_sizes_dataset())


def test_image_size_resizes_every_image():
    tensors = to_tensors(_mixed_sizes_dataset(), image_size=16)
    assert tensors.images.shape == (2, 3, 16, 16)
    assert (tensors.images[:, :, 0, 0] == torch.tensor([10, 20, 30], dtype=torch.uint8)).all()


@pytest.mark.parametrize("mode, colour", [("L", 7), ("RGBA", (7, 8, 9, 100))])
def test_grayscale_and_rgba_become_rgb(mode, colour):
    dataset = datasets.Dataset.from_dict({"image": [Image.new(mode, (4, 4), colour)], "label": [0]})
    tensors = to_tensors(dataset.cast_column("image", datasets.Image()))
    rgb = [7, 7, 7] if mode == "L" else [7, 8, 9]
    assert tensors.images.shape == (1, 3, 4, 4)
    assert tensors.images[0, :, 0, 0].tolist() == rgb


# --- subsets -----------------------------------------------------------------------------------


def test_subsample_per_class_is_balanced_and_seeded():
    tensors = identified_tensors([5, 8, 6])
    subset = subsample_per_class(tensors, per_class=4, seed=0)
    assert torch.bincount(subset.labels).tolist() == [4, 4, 4]
    assert all(tensors.labels[row] == label for row, label in zip(row_ids(subset), subset.labels))
    assert row_ids(subsample_per_class(tensors, 4, seed=0)) == row_ids(subset)
    assert row_ids(subsample_per_class(tensors, 4, seed=1)) != row_ids(subset)


def test_subsample_more_than_the_smallest_class_fails():
    with pytest.raises(ValueError, match=r"Class 'class_0' \(label 0\) has only 5 images, fewer than per_class=6"):
        subsample_per_class(identified_tensors([5, 8, 6]), per_class=6, seed=0)


# --- augmentation ------------------------------------------------------------------------------


def _pattern(count: int, size: int = 8) -> torch.Tensor:
    """`count` copies of one image whose pixels are all distinct (1..3*size*size, below 256 for size 8)."""
    image = torch.arange(1, 3 * size * size + 1, dtype=torch.uint8).view(3, size, size)
    return image.expand(count, 3, size, size).contiguous()


def test_augment_keeps_shape_and_dtype_and_is_seeded():
    images = _pattern(16)
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(3)))
    assert not torch.equal(out, augment(images, torch.Generator().manual_seed(4)))
    assert augment(images.float(), torch.Generator().manual_seed(3)).dtype == torch.float32


def test_crop_shifts_content_within_the_padding():
    images, padding = _pattern(32), 2
    padded = torch.nn.functional.pad(images[0], (padding,) * 4)
    out = augment(images, torch.Generator().manual_seed(0), padding=padding, flip=False)
    shifts = set()
    for crop in out:
        matches = [
            (dy, dx)
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
            if torch.equal(crop, padded[:, dy : dy + 8, dx : dx + 8])
        ]
        assert len(matches) == 1
        shifts.add(matches[0])
    assert len(shifts) > 5


def test_flip_mirrors_about_half_the_images():
    images = _pattern(64)
    out = augment(images, torch.Generator().manual_seed(0), padding=0, flip=True)
    flipped = [torch.equal(o, images[0].flip(-1)) for o in out]
    assert all(f or torch.equal(o, images[0]) for f, o in zip(flipped, out))
    assert 16 < sum(flipped) < 48
    assert torch.equal(augment(images, torch.Generator().manual_seed(0), padding=0, flip=False), images)


def test_normalize_range():
    out = normalize(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2))
    assert out.dtype == torch.float32 and out.flatten().tolist() == [-1.0, 1.0]
    per_channel = normalize(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), mean=[0, 0.5, 1], std=[1, 0.5, 0.25])
    assert per_channel.flatten().tolist() == [1.0, 1.0, 0.0]


# --- batches -----------------------------------------------------------------------------------


def test_batches_cover_an_epoch_without_replacement():
    sampler = BatchSampler(identified_tensors([10, 10]), seed=0)
    seen = []
    for _ in range(5):
        images, labels = sampler.next_batch(4, augment=False)
        assert images.dtype == torch.float32 and images.shape == (4, 3, 8, 8) and labels.dtype == torch.int64
        seen += row_ids_of_normalized(images)
    assert sorted(seen) == list(range(20))


def row_ids_of_normalized(images: torch.Tensor) -> list[int]:
    pixels = torch.round((images * 0.5 + 0.5) * 255).long()
    return (pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 0, 1]).tolist()


def test_batch_larger_than_the_data_gives_all_of_it():
    images, labels = BatchSampler(identified_tensors([2, 3]), seed=0).next_batch(128, augment=False)
    assert sorted(row_ids_of_normalized(images)) == [0, 1, 2, 3, 4]


def test_state_dict_round_trip_resumes_the_same_batches():
    tensors = identified_tensors([7, 6])
    sampler = BatchSampler(tensors, seed=0)
    for _ in range(3):
        sampler.next_batch(4)
    state = sampler.state_dict()
    expected = [sampler.next_batch(4) for _ in range(5)]
    resumed = BatchSampler(tensors, seed=123)
    resumed.load_state_dict(state)
    for (images, labels), (want_images, want_labels) in zip([resumed.next_batch(4) for _ in range(5)], expected):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_state_dict_for_other_data_is_rejected():
    state = BatchSampler(identified_tensors([3, 3]), seed=0)
    state.next_batch(2)
    with pytest.raises(ValueError, match="state is for 6 images, but this sampler holds 4"):
        BatchSampler(identified_tensors([2, 2]), seed=0).load_state_dict(state.state_dict())
