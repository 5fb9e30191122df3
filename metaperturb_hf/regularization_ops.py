"""The baselines' operations on one feature tensor, apart from where they are applied (as timm's `layers/drop.py`):
`regularizers.py` places them at MetaPerturb's sites."""

import math

import torch
import torch.nn.functional as F


def drop_block_2d(x: torch.Tensor, drop_prob: float, block_size: int) -> torch.Tensor:
    """DropBlock (Ghiasi, Lin & Le, NeurIPS 2018) of (B, C, H, W) maps in training.

    Drops contiguous `block_size`×`block_size` regions, each channel with its own mask (as in the authors' TPU code).
    Seeds are drawn only where a whole block fits, with γ = p / bs² · HW / ((H − bs + 1)(W − bs + 1)), and the
    kept units are rescaled by the kept fraction. Flat (B, C) features and 1×1 maps have no neighbourhood: plain
    dropout.
    """
    if drop_prob == 0.0:
        return x
    if x.dim() != 4 or x.shape[-2:] == (1, 1):
        return F.dropout(x, drop_prob, training=True)
    height, width = x.shape[-2:]
    size = min(block_size, height, width)
    valid = (height - size + 1, width - size + 1)
    gamma = drop_prob / size**2 * height * width / (valid[0] * valid[1])
    seeds = torch.rand(*x.shape[:2], *valid, device=x.device) < min(gamma, 1.0)
    # Padding by size-1 and a size×size max-pool grows each seed into the block whose top-left corner it marks.
    keep = 1.0 - F.max_pool2d(F.pad(seeds.to(x.dtype), (size - 1,) * 4), size, stride=1)
    return x * keep * (keep.numel() / keep.sum().clamp(min=1.0))


def mixup(x: torch.Tensor, lam: float, permutation: torch.Tensor) -> torch.Tensor:
    """λ·x + (1 − λ)·x[permutation]: the interpolation of Mixup, and of Manifold Mixup at a hidden layer."""
    return lam * x + (1.0 - lam) * x[permutation]


def information_dropout(x: torch.Tensor, log_alpha: torch.Tensor) -> torch.Tensor:
    """x · exp(α ⊙ ε), ε ~ N(0, 1): Information Dropout's log-normal noise (Achille & Soatto, TPAMI 2018)."""
    return x * torch.exp(log_alpha.exp() * torch.randn_like(x))


def information_dropout_kl(log_alpha: torch.Tensor, max_alpha: float) -> torch.Tensor:
    """Its KL term in the ReLU case, −log(α / (max_alpha + 0.001)) ≥ 0, averaged over units."""
    return (math.log(max_alpha + 0.001) - log_alpha).mean()
