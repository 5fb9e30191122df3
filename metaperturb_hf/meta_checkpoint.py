"""Meta-training checkpoints: every process writes its own tasks, the main process φ and its optimizer; the folder is
published only when complete (`checkpointing`), and reading one back restores all of it or nothing."""

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from . import checkpointing
from .loading import load_perturbation

TRAINER_STATE = "trainer_state.pt"
PERTURBATION = "perturbation"


def task_file(task_id: int) -> str:
    return f"task-{task_id}.pt"


def write(root: Path, step: int, trainer, barrier: Callable[[str], None]) -> Path:
    """Write `trainer`'s state at `step` under `root`; `barrier(what)` waits for every process between the phases."""
    is_main = trainer.accelerator.is_main_process
    staging = checkpointing.staging_path(root, step)
    if is_main:
        checkpointing.fresh_staging(root, step)
    barrier("the start of the checkpoint write")
    for learner in trainer.learners:
        checkpointing.save_file_atomically(learner.state_dict(), staging / task_file(learner.task.task_id))
    if is_main:
        trainer.phi.save_pretrained(staging / PERTURBATION)
        checkpointing.save_file_atomically(
            {"phi_optimizer": trainer.phi_optimizer.state_dict(), "step": step, "num_tasks": trainer.num_tasks},
            staging / TRAINER_STATE,
        )
    barrier("the end of the checkpoint write")
    if is_main:
        checkpointing.publish(root, step, keep=trainer.config.keep_checkpoints)
    barrier("the publication of the checkpoint")
    return checkpointing.checkpoint_path(root, step)


def restore(checkpoint: Path, trainer) -> int:
    """Load `checkpoint` into `trainer` (φ, its optimizer, every local task) and return its step.

    Every file is read before anything is touched, and a failure while applying rolls back what was applied.
    """
    state = _read(checkpoint, TRAINER_STATE, checkpointing.load_trusted)
    if not isinstance(state, dict) or not {"num_tasks", "step", "phi_optimizer"} <= set(state):
        raise ValueError(f"{checkpoint / TRAINER_STATE} is not a trainer state; nothing was restored.")
    if state["num_tasks"] != trainer.num_tasks:
        raise ValueError(f"{checkpoint} was written for {state['num_tasks']} tasks, this run has {trainer.num_tasks}.")
    saved_phi = _read(checkpoint, PERTURBATION, load_perturbation)
    task_states = [_read(checkpoint, task_file(learner.task.task_id), checkpointing.load_trusted)
                   for learner in trainer.learners]
    before = copy.deepcopy(_snapshot(trainer))
    try:
        _apply(trainer, [p.detach() for p in saved_phi.parameters()], state["phi_optimizer"], task_states)
    except Exception as error:
        _apply(trainer, *before)
        raise ValueError(f"{checkpoint} does not fit this run ({error}); nothing was restored.") from error
    return int(state["step"])


def _read(checkpoint: Path, name: str, reader):
    try:
        return reader(checkpoint / name)
    except Exception as error:
        raise ValueError(
            f"Cannot read {checkpoint / name} ({type(error).__name__}: {checkpointing.load_error_reason(error)}); "
            "nothing was restored. The checkpoint is damaged: resume from an earlier one with --resume <path>."
        ) from error


def _snapshot(trainer) -> tuple[list[torch.Tensor], dict, list[dict]]:
    return ([p.detach() for p in trainer.phi_parameters], trainer.phi_optimizer.state_dict(),
            [learner.state_dict() for learner in trainer.learners])


def _apply(trainer, phi_values: list[torch.Tensor], phi_optimizer: dict, task_states: list[dict]) -> None:
    with torch.no_grad():
        for parameter, value in zip(trainer.phi_parameters, phi_values, strict=True):
            parameter.copy_(value)
    trainer.phi_optimizer.load_state_dict(phi_optimizer)
    for learner, task_state in zip(trainer.learners, task_states, strict=True):
        learner.load_state_dict(task_state)
