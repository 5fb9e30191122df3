"""Class-disjoint meta-training tasks: groups, stratified halves, swapped pairs, and early size errors."""

import pytest
from conftest_data import (
    CUB,
    identified_tensors,
    image_dataset,
    isolated_hf_cache,  # noqa: F401  (fixture)
    row_ids,
)

from metaperturb_hf.tasks import build_tasks, load_tasks

pytestmark = pytest.mark.usefixtures("isolated_hf_cache")

CLASS_SIZES = [10, 9, 10, 11, 10, 10, 10, 10, 10, 10, 10, 10]


@pytest.fixture
def tensors():
    return identified_tensors(CLASS_SIZES)


def _original_labels(tensors, half):
    return [int(tensors.labels[row]) for row in row_ids(half)]


def test_groups_are_class_disjoint_cover_all_classes_and_are_balanced(tensors):
    tasks = build_tasks(tensors, num_groups=5, seed=0)
    groups = [task.classes for task in tasks[::2]]
    assert sorted(c for group in groups for c in group) == list(range(12))
    assert sorted(len(group) for group in groups) == [2, 2, 2, 3, 3]
    assert [task.group for task in tasks] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_halves_are_disjoint_stratified_and_cover_the_group(tensors):
    for task in build_tasks(tensors, num_groups=3, seed=0, swap=False):
        train, valid = row_ids(task.train), row_ids(task.valid)
        group_rows = [row for row, label in enumerate(tensors.labels.tolist()) if label in task.classes]
        assert not set(train) & set(valid)
        assert sorted(train + valid) == group_rows
        train_labels, valid_labels = _original_labels(tensors, task.train), _original_labels(tensors, task.valid)
        assert all(train_labels.count(c) - valid_labels.count(c) in (0, 1) for c in task.classes)


def test_labels_are_remapped_to_the_task_classes(tensors):
    for task in build_tasks(tensors, num_groups=4, seed=0):
        for half in (task.train, task.valid):
            assert sorted(set(half.labels.tolist())) == list(range(len(task.classes)))
            assert [task.classes[label] for label in half.labels.tolist()] == _original_labels(tensors, half)
            assert half.class_names == task.class_names == [tensors.class_names[c] for c in task.classes]


def test_swap_gives_two_tasks_per_group_with_halves_reversed(tensors):
    tasks = build_tasks(tensors, num_groups=3, seed=0)
    assert [task.task_id for task in tasks] == list(range(6))
    for first, second in zip(tasks[::2], tasks[1::2]):
        assert first.group == second.group and first.classes == second.classes
        assert row_ids(first.train) == row_ids(second.valid) and row_ids(first.valid) == row_ids(second.train)
    unswapped = build_tasks(tensors, num_groups=3, seed=0, swap=False)
    assert [task.task_id for task in unswapped] == [0, 1, 2]
    assert [row_ids(task.train) for task in unswapped] == [row_ids(task.train) for task in tasks[::2]]


def _layout(tasks):
    return [(task.classes, row_ids(task.train)) for task in tasks]


def test_seeded(tensors):
    assert _layout(build_tasks(tensors, 3, seed=7)) == _layout(build_tasks(tensors, 3, seed=7))
    assert _layout(build_tasks(tensors, 3, seed=7)) != _layout(build_tasks(tensors, 3, seed=8))


def test_fewer_classes_than_groups_fails(tensors):
    with pytest.raises(ValueError, match=r"Cannot split 12 classes into num_groups=13 .*use between 1 and 12 groups"):
        build_tasks(tensors, num_groups=13)


def test_class_with_one_image_fails():
    with pytest.raises(ValueError, match=r"Class 'class_1' \(label 1\) has 1 image; every class needs at least 2"):
        build_tasks(identified_tensors([4, 1, 4]), num_groups=1)


def test_half_smaller_than_the_batch_fails(tensors):
    build_tasks(tensors, num_groups=6, min_batch_size=9)
    message = r"Group 0 has a half of only [45] images, fewer than the batch size 9; use fewer groups"
    with pytest.raises(ValueError, match=message):
        build_tasks(tensors, num_groups=12, min_batch_size=9)


def test_load_tasks_from_a_parquet_folder(tmp_path):
    image_dataset(num_classes=6, per_class=4).to_parquet(str(tmp_path / "train.parquet"))
    tasks = load_tasks(tmp_path, num_groups=2, image_size=16, seed=1)
    assert len(tasks) == 4
    assert tasks[0].train.images.shape == (6, 3, 16, 16)
    assert all(name.startswith("class_") for name in tasks[0].class_names)


def test_load_tasks_on_cub():
    if not CUB.is_dir():
        pytest.skip(f"CUB reference data not at {CUB} (set METAPERTURB_SHARED to ../shared)")
    tasks = load_tasks(CUB, num_groups=5, min_batch_size=128)
    assert len(tasks) == 10
    assert all(len(task.classes) == 10 and len(task.train) == len(task.valid) == 150 for task in tasks)
