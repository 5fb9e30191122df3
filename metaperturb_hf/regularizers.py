"""The paper's baseline regularizers, attached at the same sites as MetaPerturb so the comparison is fair.

Each baseline wraps a classifier exactly like `PerturbedModel` does (forward hooks at the sites that
`sites.find_sites` returns, docs/sites.md), so one transfer loop trains all of them:

    reg = add_regularizer(model, "dropblock")
    optimizer = torch.optim.Adam([*model.parameters(), *reg.regularizer_parameters()], lr=1e-3)
    loss = reg.training_loss(images, labels)

Every regularizer acts only in training mode: in `eval()` the wrapped model's outputs are reproduced exactly.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .classifier_io import classifier_logits, input_name_for
from .perturbation_config import PLACEMENT_FIELDS, PerturbationConfig
from .regularization_ops import drop_block_2d, information_dropout, information_dropout_kl, mixup
from .site_wrapper import SiteWrapper, resolve_sites
from .sites import Site

__all__ = [
    "REGULARIZERS",
    "DropBlockRegularizer",
    "DropoutRegularizer",
    "InformationDropoutRegularizer",
    "ManifoldMixupRegularizer",
    "RegularizedModel",
    "add_regularizer",
]


class RegularizedModel(SiteWrapper):
    """A classifier with a regularizer at its sites; subclasses only say what happens to a site tensor.

    State-dict keys: `model.*` (the wrapped model's, unchanged) plus any learned regularizer modules.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site], input_name: str = "pixel_values"):
        super().__init__(model, sites)
        self.input_name = input_name

    def _perturb(self, site: Site, key: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """Called by the hooks; leaves the tensor untouched in eval so the wrapped model's outputs are exact."""
        return self.regularize(key, hidden_states) if self.training else hidden_states

    def regularize(self, key: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the regularizer does to one site tensor in training; subclasses override it."""
        return hidden_states

    def regularization_term(self) -> torch.Tensor | float:
        """Extra loss of the last forward pass (0 unless the regularizer has one)."""
        return 0.0

    def regularizer_parameters(self) -> list[nn.Parameter]:
        """Learned parameters of the regularizer itself, which the transfer loop's optimizer must also hold."""
        return [param for name, param in self.named_parameters() if not name.startswith("model.")]

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        """Forward `images` positionally, or as `input_name=` for a `transformers` model, and return the logits."""
        return classifier_logits(self, images, self.input_name if input_name_for(self.model) else None)

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """What the transfer loop minimises: cross-entropy plus the regularizer's own term."""
        return F.cross_entropy(self._logits(images), labels) + self.regularization_term()


def _check_probability(name: str, value: float) -> float:
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}.")
    return float(value)


class DropoutRegularizer(RegularizedModel):
    """Element-wise dropout at every site (Srivastava et al., JMLR 2014): the simplest noise baseline."""

    def __init__(self, model: nn.Module, sites: Sequence[Site], p: float = 0.1, **kwargs):
        super().__init__(model, sites, **kwargs)
        self.p = _check_probability("p", p)

    def regularize(self, key, hidden_states):
        return F.dropout(hidden_states, self.p, training=True)


class DropBlockRegularizer(RegularizedModel):
    """DropBlock (Ghiasi, Lin & Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018)
    at every site: drops contiguous regions, which removes spatially correlated information that plain dropout leaves
    recoverable from neighbours (`regularization_ops.drop_block_2d`)."""

    def __init__(
        self, model: nn.Module, sites: Sequence[Site], drop_prob: float = 0.1, block_size: int = 3, **kwargs
    ):
        super().__init__(model, sites, **kwargs)
        if int(block_size) < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.block_size = int(block_size)
        self.set_drop_prob(drop_prob)

    def set_drop_prob(self, drop_prob: float) -> None:
        """Change p, e.g. to ramp it up linearly over training as the paper does."""
        self.drop_prob = _check_probability("drop_prob", drop_prob)

    def regularize(self, key, hidden_states):
        return drop_block_2d(hidden_states, self.drop_prob, self.block_size)


class ManifoldMixupRegularizer(RegularizedModel):
    """Manifold Mixup (Verma et al., "Manifold Mixup: Better Representations by Interpolating Hidden States",
    ICML 2019).

    Each training step mixes pairs of examples at one layer drawn uniformly from the input and the sites, with
    λ ~ Beta(α, α), and trains on the same mix of their labels, which flattens class representations. Only
    `training_loss` mixes (through a one-shot hook); a plain forward is untouched in any mode. The last draw is kept
    in `last_mix = (site_name or "input", λ, permutation)`. Randomness comes from the global RNG.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site], alpha: float = 2.0, **kwargs):
        super().__init__(model, sites, **kwargs)
        if float(alpha) <= 0.0:
            raise ValueError(f"alpha must be positive, got {alpha}.")
        self.alpha = float(alpha)
        self.last_mix: tuple[str, float, torch.Tensor] | None = None
        self._pending: tuple[str, float, torch.Tensor] | None = None

    def _perturb(self, site, key, hidden_states):
        if self._pending is None or self._pending[0] != key:
            return hidden_states
        _, lam, perm = self._pending
        self._pending = None
        return mixup(hidden_states, lam, perm)

    def training_loss(self, images, labels):
        layer = int(torch.randint(len(self.sites) + 1, ()))
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        perm = torch.randperm(images.shape[0], device=images.device)
        self.last_mix = ("input" if layer == 0 else self.sites[layer - 1].name, lam, perm)
        if layer == 0:
            images = mixup(images, lam, perm)
        else:
            self._pending = (self.site_keys[layer - 1], lam, perm)
        try:
            logits = self._logits(images)
        finally:
            self._pending = None
        return lam * F.cross_entropy(logits, labels) + (1.0 - lam) * F.cross_entropy(logits, labels[perm])


class InformationDropoutRegularizer(RegularizedModel):
    """Information Dropout (Achille & Soatto, "Information Dropout: Learning Optimal Representations Through Noisy
    Computation", TPAMI 2018).

    Multiplies each site by log-normal noise exp(α ⊙ ε), ε ~ N(0, 1), whose scale α is predicted from the site
    tensor by a small learned layer (3×3 conv for maps, linear for flat features), so the network learns where it
    can afford to discard information. As in the authors' code α = 0.001 + max_alpha · sigmoid(·), max_alpha = 0.7,
    and the ReLU-case KL term is −log(α / (max_alpha + 0.001)) ≥ 0, averaged over units and sites and added with
    weight `beta`. In eval no noise is applied (h · exp(0)).
    """

    def __init__(
        self, model: nn.Module, sites: Sequence[Site], beta: float = 0.01, max_alpha: float = 0.7, **kwargs
    ):
        super().__init__(model, sites, **kwargs)
        if float(beta) < 0.0 or float(max_alpha) <= 0.0:
            raise ValueError(f"beta must be >= 0 and max_alpha > 0, got beta={beta}, max_alpha={max_alpha}.")
        self.beta, self.max_alpha = float(beta), float(max_alpha)
        reference = next(model.parameters(), None)
        self.alpha_layers = nn.ModuleDict(
            {key: self._alpha_layer(site) for key, site in zip(self.site_keys, self.sites)}
        )
        if reference is not None:
            self.alpha_layers.to(device=reference.device, dtype=reference.dtype)
        self._kl: dict[str, torch.Tensor] = {}

    @staticmethod
    def _alpha_layer(site: Site) -> nn.Module:
        """A 3×3 conv on maps; on flat features or 1×1 maps (where a padded 3×3 conv is its centre tap) a Linear."""
        if site.spatial_size == 1:
            return nn.Linear(site.channels, site.channels)
        return nn.Conv2d(site.channels, site.channels, 3, padding=1)

    def forward(self, *args, **kwargs):
        self._kl.clear()  # the KL term belongs to one forward pass
        return super().forward(*args, **kwargs)

    def log_alpha(self, key: str, hidden_states: torch.Tensor) -> torch.Tensor:
        """log α of every unit of one site, in (log 0.001, log(max_alpha + 0.001))."""
        layer = self.alpha_layers[key]
        if isinstance(layer, nn.Linear):  # mixes channels; also right if a 1×1 probe site grows at a larger input
            raw = layer(hidden_states.movedim(1, -1)).movedim(-1, 1)
        else:
            raw = layer(hidden_states)
        return torch.log(0.001 + self.max_alpha * torch.sigmoid(raw))

    def regularize(self, key, hidden_states):
        log_alpha = self.log_alpha(key, hidden_states)
        self._kl[key] = information_dropout_kl(log_alpha, self.max_alpha)
        return information_dropout(hidden_states, log_alpha)

    def kl_term(self) -> torch.Tensor:
        """Mean KL of the last training forward pass over its sites (0 before any)."""
        if not self._kl:
            return torch.zeros(())
        return torch.stack(list(self._kl.values())).mean()

    def regularization_term(self):
        return self.beta * self.kl_term()


REGULARIZERS: dict[str, type[RegularizedModel]] = {
    "dropout": DropoutRegularizer,
    "dropblock": DropBlockRegularizer,
    "manifold_mixup": ManifoldMixupRegularizer,
    "info_dropout": InformationDropoutRegularizer,
}


def add_regularizer(
    model: nn.Module,
    name: str,
    config: PerturbationConfig | None = None,
    *,
    example_inputs=None,
    input_size: Sequence[int] | None = None,
    input_name: str = "pixel_values",
    **options,
) -> RegularizedModel:
    r"""
    Attach the baseline `name` (a key of `REGULARIZERS`) at MetaPerturb's sites of `model` and return the wrapper.

    `config` (a `PerturbationConfig`, e.g. the one of a MetaPerturb run) or the keywords `sites`, `select` and
    `num_sites` choose the sites, and `example_inputs` and `input_size` run the probe pass, as in
    `injection.add_perturbation`, so a baseline is placed exactly where MetaPerturb is; only the config's placement
    fields are read. `input_name` is the keyword `training_loss` passes images under to a `transformers` model.
    The other `options` go to the regularizer (dropout: `p`; dropblock: `drop_prob`, `block_size`; manifold_mixup:
    `alpha`; info_dropout: `beta`, `max_alpha`).
    """
    if name not in REGULARIZERS:
        raise ValueError(f"Unknown regularizer {name!r}; available: {', '.join(sorted(REGULARIZERS))}.")
    config = PerturbationConfig.build(config, **{key: options.pop(key) for key in PLACEMENT_FIELDS if key in options})
    chosen = resolve_sites(model, config, example_inputs=example_inputs, input_size=input_size)
    return REGULARIZERS[name](model, chosen, input_name=input_name, **options)
