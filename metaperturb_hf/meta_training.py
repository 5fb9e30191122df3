"""Meta-training φ over class-disjoint tasks with accelerate (docs/protocols.md).

Every task trains its own classifier (private to the process that holds it, never synchronised); φ is shared. One
step: for each task, a θ step on a batch of its training half with the perturbation active, then the gradient of
the loss on a batch of its validation half with respect to φ, BatchNorm in evaluation mode (first order, or through
a one-step lookahead). The φ-gradients are averaged over all tasks of all processes (one flat all-reduce of 82
numbers) and φ takes one Adam step, so φ is identical everywhere after every step.

Randomness (classifier init, batches, augmentation, noise) is drawn per task from generators seeded by the task id,
so a run depends on its seed and task set, not on how many processes share the tasks.
"""

import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, is_tensorboard_available
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from . import checkpointing, meta_checkpoint
from .architectures import create_model, list_models
from .configuration_metaperturb import MetaPerturbConfig
from .data import BatchSampler
from .injection import add_perturbation
from .loading import load_perturbation
from .meta_training_record import build_record, read_record, write_record
from .modeling_metaperturb import MetaPerturbModel
from .tasks import Task
from .tracking import JsonlTracker


@dataclass
class MetaTrainingConfig:
    """Hyper-parameters of meta-training; the defaults are the authors' (docs/protocols.md). Every field is also a
    flag of `examples/meta_train.py` (through `HfArgumentParser`, with its help text)."""

    source: str = field(default="", metadata={"aliases": ["--dataset"], "help": (
        "the source dataset: hub id, Parquet folder/glob/file, or imagefolder directory (recorded with φ)")})
    architectures: list[str] = field(default_factory=lambda: ["resnet20"], metadata={"aliases": ["--arch"], "help": (
        "architecture(s) of the task classifiers, cycled over tasks (`conv4,resnet20` or `conv4 resnet20`)")})
    steps: int = field(default=750, metadata={"help": "meta-training steps"})
    batch_size: int = field(default=128, metadata={"help": "images per task half per step"})
    learning_rate: float = field(default=1e-3, metadata={"aliases": ["--lr"], "help": (
        "Adam learning rate of θ and φ")})
    weight_decay: float = field(default=5e-4, metadata={"help": "Adam's L2 weight decay of θ (and of φ by default)"})
    image_size: int = field(default=32, metadata={"help": "images are resized to this size"})
    seed: int = field(default=0, metadata={"help": (
        "seed of the task split, the classifiers, the batches and the noise")})
    lookahead: bool = field(default=False, metadata={"help": (
        "φ-gradient through a one-step lookahead of θ (slower; default: first order, as the authors)")})
    lookahead_step_size: float = field(default=0.1, metadata={"help": "α of the lookahead θ' = θ − α∇θ"})
    checkpoint_every: int = field(default=100, metadata={"help": "steps between checkpoints (0: never)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "steps between logged metrics"})
    output_dir: str = field(default="metaperturb-output", metadata={"help": (
        "φ (save_pretrained), meta_training.json, checkpoints/ and logs/ go here")})
    mixed_precision: Literal["no", "bf16"] = field(default="no", metadata={"help": "autocast of the classifiers"})
    # φ's own optimisation: each field is an explicit departure from the authors' protocol when changed.
    phi_weight_decay: float | None = field(default=None, metadata={"help": (
        "φ's weight decay (default: weight_decay)")})
    phi_weight_decay_mode: Literal["l2", "decoupled"] = field(default="l2", metadata={"help": (
        "φ's weight decay as Adam's L2 term (the authors') or decoupled as in AdamW")})
    phi_weight_decay_start: int = field(default=0, metadata={"help": (
        "first step at which φ's weight decay applies (0: from the start)")})
    # The authors' run averages the draws of its 10 processes (10), which shrinks the initial value by sqrt(10).
    phi_init_std: float | None = field(default=None, metadata={"help": (
        "std of φ's initial N(0, std) (default: the φ config's initializer_range, 0.01)")})
    phi_init_average: int = field(default=1, metadata={"help": (
        "average φ's initial value over this many draws (the authors' 10 processes: 10)")})
    # Continuing a released φ on another source, or asking whether a φ is where this protocol's meta-gradient stays.
    phi_init_from: str | None = field(default=None, metadata={"help": (
        "start from this φ instead of a random one: a save_pretrained folder, hub repo id or the authors' .pth")})
    # Bounds the wait when another process dies or stalls; torch's default, which also covers the barrier while the
    # main process alone loads the dataset.
    collective_timeout: float = field(default=1800.0, metadata={"help": (
        "seconds a process waits at a collective for the others before it stops with an error")})

    @property
    def phi_decay(self) -> float:
        """φ's weight decay once it applies."""
        return self.weight_decay if self.phi_weight_decay is None else self.phi_weight_decay

    def __post_init__(self):
        names = [self.architectures] if isinstance(self.architectures, str) else self.architectures
        self.architectures = [name.strip() for item in names for name in item.split(",") if name.strip()]
        unknown = [name for name in self.architectures if name not in list_models()]
        if not self.architectures or unknown:
            raise ValueError(f"Unknown architecture(s) {unknown or self.architectures}; choose from {list_models()}.")
        if self.phi_weight_decay_mode not in ("l2", "decoupled"):
            raise ValueError(f"phi_weight_decay_mode must be 'l2' or 'decoupled', got {self.phi_weight_decay_mode!r}.")
        if self.phi_weight_decay is not None and self.phi_weight_decay < 0:
            raise ValueError(f"phi_weight_decay must be >= 0, got {self.phi_weight_decay}.")
        if self.phi_weight_decay_start < 0:
            raise ValueError(f"phi_weight_decay_start must be >= 0, got {self.phi_weight_decay_start}.")
        if self.phi_init_std is not None and not self.phi_init_std > 0:
            raise ValueError(f"phi_init_std must be positive, got {self.phi_init_std}.")
        if self.phi_init_from and (self.phi_init_std is not None or self.phi_init_average != 1):
            raise ValueError("phi_init_from starts from a given φ; drop phi_init_std and phi_init_average, which "
                             "describe a random one.")
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints", "phi_init_average"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not self.collective_timeout > 0:
            raise ValueError("collective_timeout must be a positive number of seconds, "
                             f"got {self.collective_timeout}.")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 disables), got {self.checkpoint_every}.")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(
                f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r} (fp16 would need loss scaling "
                "of the 82 φ-gradients; use bf16)."
            )


def _task_seed(seed: int, task_id: int, stream: int) -> int:
    """Independent seeds per (run, task, use), the same whichever process holds the task."""
    return (seed * 1_000_003 + task_id * 101 + stream) % (2**63)


def _set_batchnorm_eval(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def create_accelerator(config: MetaTrainingConfig) -> Accelerator:
    """An Accelerator logging to a JSONL file always and to TensorBoard when it is installed; its collectives give up
    after `config.collective_timeout` seconds (when it is the first one of the process to set up distribution)."""
    trackers = [JsonlTracker("logs", config.output_dir)] + (["tensorboard"] if is_tensorboard_available() else [])
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout))
    return Accelerator(mixed_precision=config.mixed_precision, log_with=trackers, project_dir=config.output_dir,
                       kwargs_handlers=[timeout])


def initial_phi(config: MetaTrainingConfig, phi_config: MetaPerturbConfig | None = None) -> MetaPerturbModel:
    """φ before meta-training, the same on every process: `phi_init_from` loaded, or the mean of `phi_init_average`
    seeded N(0, std) draws."""
    if config.phi_init_from:
        return load_perturbation(config.phi_init_from)
    phi_config = phi_config or MetaPerturbConfig()
    if config.phi_init_std is not None:
        phi_config = MetaPerturbConfig(**{**phi_config.to_diff_dict(), "initializer_range": config.phi_init_std})
    torch.manual_seed(config.seed)
    draws = [MetaPerturbModel(phi_config) for _ in range(config.phi_init_average)]
    phi = draws[0]
    with torch.no_grad():
        for parameter, *others in zip(phi.parameters(), *(draw.parameters() for draw in draws[1:])):
            parameter.copy_(torch.stack([parameter, *others]).mean(0))
    return phi


def phi_optimizer(parameters: list[nn.Parameter], config: MetaTrainingConfig) -> torch.optim.Optimizer:
    """Adam for φ with its weight decay as Adam's L2 term (the authors') or decoupled (AdamW), starting at zero when
    `phi_weight_decay_start` > 0 (`MetaTrainer` raises it at that step)."""
    decay = 0.0 if config.phi_weight_decay_start else config.phi_decay
    optimizer = torch.optim.AdamW if config.phi_weight_decay_mode == "decoupled" else torch.optim.Adam
    return optimizer(parameters, lr=config.learning_rate, weight_decay=decay)


def _phi_groups(flat: torch.Tensor, phi: MetaPerturbModel) -> dict[str, torch.Tensor]:
    """A flat vector in φ's parameter order, cut into its groups: λ and γ of each layer, K, w."""
    identity, mean, stat, scale = flat.split([p.numel() for p in phi.parameters()])
    half = identity.numel() // 2
    return {"lambda1": identity[:half], "lambda2": identity[half:], "gamma1": mean[:half], "gamma2": mean[half:],
            "K": stat, "w": scale}


def phi_statistics(phi: MetaPerturbModel, grad: torch.Tensor | None = None) -> dict[str, float]:
    """Mean |parameter| of each of φ's groups (λ, γ per layer, K, w) and, with `grad` (flat, φ's order), each
    group's gradient norm and its cosine with the parameters (> 0: a descent step shrinks the group toward 0):
    whether the noise generator has left the origin, and whether the loss or the weight decay pulls it back."""
    params = _phi_groups(torch.cat([p.detach().flatten() for p in phi.parameters()]), phi)
    stats = {f"phi/mean_abs_{name}": float(value.abs().mean()) for name, value in params.items()}
    if grad is not None:
        for name, value in _phi_groups(grad, phi).items():
            stats[f"phi/grad_norm_{name}"] = float(value.norm())
            stats[f"phi/grad_cos_{name}"] = float(F.cosine_similarity(value, params[name].to(value.dtype), dim=0))
    return stats


def phi_adam_steps(optimizer_state: dict, phi: MetaPerturbModel) -> dict[str, float]:
    """Adam's step of each of φ's groups as a fraction of the learning rate (the group's mean |m̂| / (√v̂ + ε)),
    from φ's optimizer's `state_dict()`, live or a checkpoint's. Near 1 the group's gradient keeps its sign and the
    group moves at the learning rate; near 0 its running mean is small against the magnitudes the second moment
    remembers (β₂ = 0.999: about the last thousand steps), so the group stands still however large its gradient."""
    (group,) = optimizer_state["param_groups"]
    states = [optimizer_state["state"].get(index) for index in group["params"]]
    if not all(states):  # before the first step
        return {}
    beta1, beta2 = group["betas"]
    ratios = []
    for state in states:
        step = float(state["step"])
        m_hat = state["exp_avg"] / (1 - beta1**step)
        v_hat = state["exp_avg_sq"] / (1 - beta2**step)
        ratios.append((m_hat.abs() / (v_hat.sqrt() + group["eps"])).flatten())
    return {f"phi/adam_step_{name}": float(value.mean())
            for name, value in _phi_groups(torch.cat(ratios), phi).items()}


class TaskLearner:
    """One task's perturbed classifier, its optimizer, its batch samplers and its own random stream."""

    def __init__(self, task: Task, architecture: str, phi: MetaPerturbModel, config: MetaTrainingConfig, device):
        self.task, self.architecture, self.device = task, architecture, torch.device(device)
        size = config.image_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_task_seed(config.seed, task.task_id, 0))
            classifier = create_model(architecture, len(task.classes), image_size=size)
            self.model = add_perturbation(classifier, phi, trainable=True, input_size=(3, size, size))
        self.model.to(self.device)
        self.classifier = classifier
        self.parameters = [p for p in classifier.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.train_batches = BatchSampler(task.train.to(self.device), seed=_task_seed(config.seed, task.task_id, 1))
        self.valid_batches = BatchSampler(task.valid.to(self.device), seed=_task_seed(config.seed, task.task_id, 2))
        self.noise_generator = torch.Generator(self.device).manual_seed(_task_seed(config.seed, task.task_id, 3))

    @contextmanager
    def own_randomness(self):
        """Make the global generator of the device this task's own while its passes run (noise, dropout)."""
        is_cuda = self.device.type == "cuda"
        outer = torch.cuda.get_rng_state(self.device) if is_cuda else torch.get_rng_state()
        (torch.cuda.set_rng_state if is_cuda else torch.set_rng_state)(self.noise_generator.get_state())
        try:
            yield
        finally:
            self.noise_generator.set_state(torch.cuda.get_rng_state(self.device) if is_cuda else torch.get_rng_state())
            (torch.cuda.set_rng_state if is_cuda else torch.set_rng_state)(outer)

    def state_dict(self) -> dict:
        model_state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("perturbation.")}
        return {
            "model": model_state,
            "optimizer": self.optimizer.state_dict(),
            "train_batches": self.train_batches.state_dict(),
            "valid_batches": self.valid_batches.state_dict(),
            "noise_generator": self.noise_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state["model"], strict=False)
        if unexpected or any(not key.startswith("perturbation.") for key in missing):
            raise ValueError(f"Task {self.task.task_id}: checkpoint does not match its classifier "
                             f"({missing=}, {unexpected=}).")
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_batches.load_state_dict(state["train_batches"])
        self.valid_batches.load_state_dict(state["valid_batches"])
        self.noise_generator.set_state(state["noise_generator"])


class MetaTrainer:
    r"""
    Meta-trains one φ over `tasks` on however many processes `accelerate` launched.

    ```python
    tasks = load_tasks("path/to/parquet", num_groups=5)
    trainer = MetaTrainer(MetaTrainingConfig(architectures=["resnet20"], steps=750), tasks)
    phi = trainer.train()   # also written to output_dir with save_pretrained, beside meta_training.json
    ```
    """

    def __init__(
        self,
        config: MetaTrainingConfig,
        tasks: list[Task],
        accelerator: Accelerator | None = None,
        phi_config: MetaPerturbConfig | None = None,
    ):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or create_accelerator(config)
        world = self.accelerator.num_processes
        if len(tasks) < world:
            raise ValueError(f"{len(tasks)} tasks cannot be spread over {world} processes; "
                             "use more groups or fewer processes.")
        self._check_batch_fits(tasks)
        self.num_tasks = len(tasks)
        self.tasks = tasks

        self.phi = initial_phi(config, phi_config).to(self.accelerator.device)
        self.phi_parameters = list(self.phi.parameters())
        self.phi_optimizer = phi_optimizer(self.phi_parameters, config)
        local_tasks = tasks[self.accelerator.process_index :: world]
        self.learners = [
            TaskLearner(task, config.architectures[task.task_id % len(config.architectures)], self.phi, config,
                        self.accelerator.device)
            for task in local_tasks
        ]
        self.step = 0
        self.interrupted = False
        self._stop_requested = False
        self._last_metrics: dict = {}
        self._nonfinite: list[str] = []  # why this process's contribution to the current step is NaN/Inf

    def _check_batch_fits(self, tasks: list[Task]) -> None:
        for task in tasks:
            smallest = min(len(task.train), len(task.valid))
            if smallest < self.config.batch_size:
                raise ValueError(
                    f"Task {task.task_id} has only {smallest} images in a half, fewer than batch_size="
                    f"{self.config.batch_size}; use fewer groups or a smaller batch size."
                )

    # ----------------------------------------------------------------------------------------------------- the step
    def _autocast(self):
        return self.accelerator.autocast() if self.config.mixed_precision != "no" else nullcontext()

    def _task_step(self, learner: TaskLearner, record: bool) -> tuple[list[torch.Tensor], dict]:
        """θ step on the training half, then the φ-gradient on the validation half (metrics only when `record`)."""
        model, size = learner.model, self.config.batch_size
        monitoring = self.phi.monitoring() if record else nullcontext([])
        with monitoring as calls, learner.own_randomness():
            model.train()
            images, labels = learner.train_batches.next_batch(size)
            with self._autocast():
                train_logits = model(images)
                train_loss = F.cross_entropy(train_logits.float(), labels)
            if not torch.isfinite(train_loss):
                # No θ step from a NaN/Inf loss: the classifier stays as it was; the NaN φ-gradient stops every
                # process at this step (see _meta_step).
                loss = float(train_loss.detach())
                self._nonfinite.append(f"the training loss of task {learner.task.task_id} is {loss}")
                return [torch.full_like(p, float("nan")) for p in self.phi_parameters], {}
            valid_images, valid_labels = learner.valid_batches.next_batch(size)
            if self.config.lookahead:
                valid_logits, theta_grads = self._lookahead_valid_logits(learner, train_loss, valid_images)
            else:
                learner.optimizer.zero_grad(set_to_none=True)
                train_loss.backward(inputs=learner.parameters)
                learner.optimizer.step()
                _set_batchnorm_eval(learner.classifier)
                with self._autocast():
                    valid_logits = model(valid_images)
            valid_loss = F.cross_entropy(valid_logits.float(), valid_labels)
            if not torch.isfinite(valid_loss):
                loss = float(valid_loss.detach())
                self._nonfinite.append(f"the validation loss of task {learner.task.task_id} is {loss}")
            phi_grads = torch.autograd.grad(valid_loss, self.phi_parameters)
            if self.config.lookahead:  # θ moves only once φ's gradient no longer needs it
                for parameter, grad in zip(learner.parameters, theta_grads):
                    parameter.grad = grad.detach()
                learner.optimizer.step()
            model.train()
        if not record:
            return phi_grads, {}
        site_scales, site_noises = (torch.stack(values).float() for values in zip(*calls))
        scale, noise = site_scales.mean(), site_noises.mean()
        # One entry per φ call: the training pass's sites, then the validation pass's.
        num_sites = len(model.sites)
        per_site = {f"site{i}/mean_{name}": values[num_sites + i] for i in range(num_sites)
                    for name, values in (("s", site_scales), ("z", site_noises)) if len(values) == 2 * num_sites}
        metrics = {
            **per_site,
            "train_loss": train_loss.detach(),
            "train_accuracy": (train_logits.argmax(-1) == labels).float().mean(),
            "valid_loss": valid_loss.detach(),
            "valid_accuracy": (valid_logits.argmax(-1) == valid_labels).float().mean(),
            "mean_s": scale,
            "mean_z": noise,
        }
        return phi_grads, metrics

    def _lookahead_valid_logits(self, learner: TaskLearner, train_loss, valid_images):
        """Validation logits at θ' = θ − α∇θ L_train, differentiable in φ through θ' (Ren et al., 2018),
        and the θ-gradients for the θ step that follows."""
        names = [name for name, p in learner.classifier.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(train_loss, learner.parameters, create_graph=True)
        alpha = self.config.lookahead_step_size
        fast = {name: p - alpha * g for name, p, g in zip(names, learner.parameters, grads)}
        _set_batchnorm_eval(learner.classifier)
        with self._autocast():
            valid_logits = functional_call(learner.classifier, fast, (valid_images,))
        return valid_logits, grads

    def _meta_step(self, record: bool = True) -> dict:
        summed = [torch.zeros_like(p) for p in self.phi_parameters]
        metrics = {}
        self._nonfinite = []
        for learner in self.learners:
            grads, metrics[learner.task.task_id] = self._task_step(learner, record)
            for total, grad in zip(summed, grads):
                total += grad
        # One all-reduce carries the φ-gradients and whether any process was asked to stop.
        flat = torch.cat([g.flatten() for g in summed] + [summed[0].new_tensor([float(self._stop_requested)])])
        if self.accelerator.num_processes > 1:
            with self._collective("the all-reduce of the φ-gradients"):
                flat = self.accelerator.reduce(flat, reduction="sum")
        mean_grad = flat[:-1] / self.num_tasks
        if not torch.isfinite(mean_grad).all():
            cause = "; ".join(self._nonfinite) or "the φ-gradient is NaN/Inf (from this or another process)"
            raise FloatingPointError(
                f"Meta-training stopped at step {self.step + 1}: {cause}. φ was not updated; {self._last_good()}. "
                "Lower the learning rate or use mixed_precision='no'."
            )
        offset = 0
        for parameter in self.phi_parameters:
            parameter.grad = mean_grad[offset : offset + parameter.numel()].view_as(parameter).clone()
            offset += parameter.numel()
        if self.config.phi_weight_decay_start and self.step + 1 == self.config.phi_weight_decay_start:
            for group in self.phi_optimizer.param_groups:
                group["weight_decay"] = self.config.phi_decay
        self.phi_optimizer.step()
        self._stop_requested = bool(flat[-1] > 0)
        metrics["phi_grad_norm"] = mean_grad.norm()
        metrics["phi_grad"] = mean_grad
        return metrics

    # ----------------------------------------------------------------------------------------------- the loop
    def train(self) -> MetaPerturbModel:
        """Run until `steps` (or Ctrl-C, which checkpoints and returns with `interrupted` set); return φ."""
        accelerator, config = self.accelerator, self.config
        accelerator.init_trackers("meta_training", config=self._run_description())
        for tracker in accelerator.trackers:
            if isinstance(tracker, JsonlTracker):
                tracker.drop_after(self.step)  # what a killed run logged past its last checkpoint
        accelerator.print(
            f"Meta-training φ on {self.num_tasks} tasks over {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type}, {accelerator.device}); architectures {config.architectures}."
        )
        started, first_step = time.time(), self.step
        previous_handler = signal.signal(signal.SIGINT, self._request_stop)
        progress = tqdm(total=config.steps, initial=self.step, disable=not accelerator.is_main_process,
                        desc="meta-training")
        try:
            while self.step < config.steps and not self.interrupted:
                record = (self.step + 1) % config.log_every == 0 or self.step + 1 == config.steps
                metrics = self._meta_step(record)
                self.step += 1
                progress.update(1)
                if record:
                    self._log(metrics, progress)
                if self._stop_requested:
                    self.interrupted = True
                if self.interrupted or (config.checkpoint_every and self.step % config.checkpoint_every == 0):
                    self.save_checkpoint()
        finally:
            signal.signal(signal.SIGINT, previous_handler)
            progress.close()
        if self.interrupted:
            accelerator.print(f"Interrupted: checkpoint written at step {self.step}; rerun with --resume to continue.")
        elif self.step == first_step and read_record(self.output_dir):  # resumed a finished run: keep its record
            accelerator.print(f"Already finished at step {self.step}; {self.output_dir} is left as it was.")
        else:
            self._save_final(time.time() - started)
        accelerator.end_training()
        return self.phi

    def _request_stop(self, signum, frame):
        if self._stop_requested:  # a second Ctrl-C aborts at once
            raise KeyboardInterrupt
        self._stop_requested = True

    def _log(self, metrics: dict, progress) -> None:
        local = {task_id: {k: float(v) for k, v in values.items()} for task_id, values in metrics.items()
                 if task_id not in ("phi_grad_norm", "phi_grad")}
        per_task = {}
        if self.accelerator.num_processes > 1:
            with self._collective("the gathering of the logged metrics"):
                parts = gather_object([local])
        else:
            parts = [local]
        for part in parts:
            per_task.update(part)
        names = dict.fromkeys(name for task_metrics in per_task.values() for name in task_metrics)
        summary = {}
        for name in names:  # per-site entries exist only for tasks whose network has that site
            task_values = [m[name] for m in per_task.values() if name in m]
            summary[name] = sum(task_values) / len(task_values)
        summary["phi_grad_norm"] = float(metrics["phi_grad_norm"])
        summary.update(phi_statistics(self.phi, metrics["phi_grad"]))
        summary.update(phi_adam_steps(self.phi_optimizer.state_dict(), self.phi))
        values = dict(summary)
        for task_id, task_metrics in sorted(per_task.items()):
            values.update({f"task{task_id}/{name}": value for name, value in task_metrics.items()
                           if not name.startswith("site")})
        self.accelerator.log(values, step=self.step)
        self._last_metrics = summary
        progress.set_postfix(valid_loss=f"{summary['valid_loss']:.3f}", valid_acc=f"{summary['valid_accuracy']:.3f}")

    # --------------------------------------------------------------------------------------------- saving
    def save_checkpoint(self) -> Path:
        """Every process writes its tasks, the main process φ; the folder appears only when complete."""
        return meta_checkpoint.write(self.output_dir / "checkpoints", self.step, self, self._barrier)

    def _barrier(self, what: str) -> None:
        with self._collective(what):
            self.accelerator.wait_for_everyone()

    @contextmanager
    def _collective(self, what: str):
        """Turn the failure of a collective (a peer that died, or stalled past `collective_timeout`) into an error
        that says what happened, instead of torch's transport message alone."""
        try:
            yield
        except RuntimeError as error:  # gloo/NCCL errors and timeouts (DistBackendError is a RuntimeError)
            if self.accelerator.num_processes == 1:
                raise
            state = self.accelerator.state
            raise RuntimeError(
                f"Process {state.process_index} of {state.num_processes} stopped after {self.step} completed steps: "
                f"{what} failed, most often because another process died or did not answer within "
                f"collective_timeout={self.config.collective_timeout:g} s (see its own log); {self._last_good()}. "
                f"Rerun with --resume. Cause: {error}"
            ) from error

    def _last_good(self) -> str:
        latest = checkpointing.latest_checkpoint(self.output_dir / "checkpoints")
        return f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written yet"

    def resume(self, checkpoint: str | Path | None = None) -> int:
        """Restore φ, its optimizer and every local task from `checkpoint` (default: the latest); return the step."""
        checkpoint = (Path(checkpoint) if checkpoint
                      else checkpointing.latest_checkpoint(self.output_dir / "checkpoints"))
        if checkpoint is None:
            self.accelerator.print(f"No checkpoint under {self.output_dir / 'checkpoints'}; starting from step 0.")
            return 0
        self.step = meta_checkpoint.restore(checkpoint, self)
        self.accelerator.print(f"Resumed from {checkpoint} at step {self.step}.")
        return self.step

    def _run_description(self) -> dict:
        return {
            **asdict(self.config),
            "architectures": ",".join(self.config.architectures),
            "num_tasks": self.num_tasks,
            "num_processes": self.accelerator.num_processes,
        }

    def _save_final(self, wall_seconds: float) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.phi.save_pretrained(self.output_dir)
        write_record(self.output_dir, build_record(self.config, self.tasks, self.step, self.accelerator.num_processes,
                                                   wall_seconds, self._last_metrics))
