"""Class-disjoint meta-training tasks (docs/protocols.md).

The source classes are split into groups; each group's images are halved, per class, into A and B;
a group gives the task "train on A, validate on B" and, swapped, "train on B, validate on A". Both
halves come from the source's training split, so the perturbation function is meta-learned on
validation data its task's classifier never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import ImageTensors, load_image_dataset, shuffled_class_indices, to_tensors


@dataclass
class Task:
    """One meta-training task; `classes[k]` is the original label id of task label `k`."""

    task_id: int
    group: int
    classes: list[int]
    class_names: list[str]
    train: ImageTensors
    valid: ImageTensors


def build_tasks(
    tensors: ImageTensors, num_groups: int, seed: int = 0, swap: bool = True, min_batch_size: int = 1
) -> list[Task]:
    """Split the classes into `num_groups` class-disjoint groups, and each group into two tasks (one if not `swap`).

    Task `2g` trains on group g's half A and validates on half B; task `2g + 1` is the reverse (the
    two tasks share the half tensors, no copy). Every size problem is reported before any image is copied.
    """
    generator = torch.Generator().manual_seed(seed)
    by_class = shuffled_class_indices(tensors.labels, generator)
    classes = list(by_class)
    if num_groups < 1 or len(classes) < num_groups:
        raise ValueError(
            f"Cannot split {len(classes)} classes into num_groups={num_groups} class-disjoint groups; "
            f"use between 1 and {len(classes)} groups."
        )
    _check_classes_halvable(by_class, tensors.class_names)
    permuted = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    groups = [permuted[g::num_groups] for g in range(num_groups)]
    for group, group_classes in enumerate(groups):
        _check_half_size(group, sum(len(by_class[c]) // 2 for c in group_classes), min_batch_size)
    tasks = []
    for group, group_classes in enumerate(groups):
        half_a, half_b = _halves(tensors, by_class, group_classes)
        pairs = [(half_a, half_b), (half_b, half_a)] if swap else [(half_a, half_b)]
        for train, valid in pairs:
            tasks.append(Task(len(tasks), group, list(group_classes), list(train.class_names), train, valid))
    return tasks


def _check_classes_halvable(by_class: dict[int, torch.Tensor], class_names: list[str]) -> None:
    for c, indices in by_class.items():
        if len(indices) < 2:
            raise ValueError(
                f"Class {class_names[c]!r} (label {c}) has {len(indices)} image; every class needs at least 2 "
                f"to give both halves A and B an image. Remove the class or add images."
            )


def _check_half_size(group: int, smaller_half: int, min_batch_size: int) -> None:
    if smaller_half < min_batch_size:
        raise ValueError(
            f"Group {group} has a half of only {smaller_half} images, fewer than the batch size {min_batch_size}; "
            f"use fewer groups (more classes per group) or a smaller batch size."
        )


def _halves(
    tensors: ImageTensors, by_class: dict[int, torch.Tensor], group_classes: list[int]
) -> tuple[ImageTensors, ImageTensors]:
    """Halve each class's shuffled images into A (the odd one out included) and B, relabelled to 0..k-1."""
    remap = torch.full((len(tensors.class_names),), -1, dtype=torch.long)
    remap[group_classes] = torch.arange(len(group_classes))
    names = [tensors.class_names[c] for c in group_classes]
    cuts = [(len(by_class[c]) + 1) // 2 for c in group_classes]
    half_a = torch.cat([by_class[c][:cut] for c, cut in zip(group_classes, cuts)])
    half_b = torch.cat([by_class[c][cut:] for c, cut in zip(group_classes, cuts)])
    return _relabelled(tensors, half_a, remap, names), _relabelled(tensors, half_b, remap, names)


def _relabelled(tensors: ImageTensors, indices: torch.Tensor, remap: torch.Tensor, names: list[str]) -> ImageTensors:
    indices = indices.sort().values
    return ImageTensors(tensors.images[indices], remap[tensors.labels[indices]], list(names))


def load_tasks(
    source,
    num_groups: int,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    image_size: int | None = None,
    seed: int = 0,
    swap: bool = True,
    min_batch_size: int = 1,
) -> list[Task]:
    """Load `source` (see `load_image_dataset`), decode it once, and build the meta-training tasks."""
    dataset = load_image_dataset(source, split=split, image_column=image_column, label_column=label_column)
    tensors = to_tensors(dataset, image_column=image_column, label_column=label_column, image_size=image_size)
    return build_tasks(tensors, num_groups, seed=seed, swap=swap, min_batch_size=min_batch_size)
