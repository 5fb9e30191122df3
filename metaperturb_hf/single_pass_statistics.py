"""The single pass's own copy of a classifier's norm statistics (`PerturbedModel.calibrate_single_pass`): the
classifier's BatchNorm statistics were gathered in training under sampled noise, so the deterministic single pass
keeps statistics of its own, estimated or matched under that mode, and MC keeps the classifier's."""

import torch
from torch import nn

from .sites import unique_keys

# The buffers of a norm layer that the single-pass mode keeps its own copy of.
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def running_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers of `model` that normalise with running statistics in evaluation (BatchNorm and the like)."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        and module.track_running_stats
        and module.running_mean is not None
    ]


class SinglePassStatistics(nn.Module):
    """The classifier's norm statistics as re-estimated under the single pass, and the κ they were estimated at.

    Keys: `noise_coeff` and `norms.<norm layer>.{running_mean, running_var, num_batches_tracked}`.
    """

    def __init__(self, norms: list[tuple[str, nn.Module]], noise_coeff: float):
        super().__init__()
        self.register_buffer("noise_coeff", torch.tensor(float(noise_coeff), dtype=torch.float64))
        self.kappa = float(noise_coeff)  # a Python copy: reading the buffer on a GPU would synchronise every forward
        self.register_load_state_dict_post_hook(_remember_kappa)
        self.norms = nn.ModuleDict()
        for key, (_, norm) in zip(unique_keys([name for name, _ in norms]), norms):
            statistics = nn.Module()
            for name in RUNNING_STATISTICS:
                statistics.register_buffer(name, torch.zeros_like(getattr(norm, name)))
            statistics.running_var.fill_(1.0)  # reset_running_stats' starting point
            self.norms[key] = statistics


def _remember_kappa(store: SinglePassStatistics, incompatible_keys) -> None:
    store.kappa = float(store.noise_coeff)
