"""Configuration of the MetaPerturb perturbation function."""

import dataclasses
import difflib

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


def check_noise_strength(noise_strength: float | None) -> None:
    """A final κ of transfer in (0, 1], or None for φ's own."""
    if noise_strength is not None and not 0.0 < noise_strength <= 1.0:
        raise ValueError(f"noise_strength is the final κ and must lie in (0, 1], got {noise_strength}.")


@strict
class MetaPerturbConfig(PreTrainedConfig):
    r"""
    Configuration of [`MetaPerturbModel`], the 82-parameter perturbation function of MetaPerturb
    (Ryu et al., NeurIPS 2020).

    The function is shared by every perturbed layer of every network it is plugged into, so nothing here
    depends on a network: channel counts and spatial sizes are passed at call time.

    Args:
        kernel_size (`int`, defaults to 3):
            Side of the square kernels shared by all channels (noise generator and statistics filters).
        num_stat_filters (`int`, defaults to 4):
            Number of filters whose pooled, rectified responses feed the channel-scale statistics.
        stat_momentum (`float`, defaults to 0.1):
            Momentum of the BatchNorm-style running statistics each site keeps.
        clip_value (`float`, defaults to 100.0):
            Upper clamp of the perturbed features in training, as in the authors' code.
        initializer_range (`float`, defaults to 0.01):
            Standard deviation of the normal initialisation of every parameter.
        noise_strength (`float`, defaults to 1.0):
            The κ that transfer anneals the perturbation to unless told otherwise: 1 applies it in full (the
            authors' protocol); a φ whose full noise over-regularizes is released with less (0.5 mixes the
            identity in half way). Read by `TransferConfig` and `MetaPerturbCallback` when they are given none.
    """

    model_type = "metaperturb"
    # Fields added after the first releases: a config saved before them loads with their default.
    optional_fields = ("noise_strength",)

    kernel_size: int = 3
    num_stat_filters: int = 4
    stat_momentum: float = 0.1
    clip_value: float = 100.0
    initializer_range: float = 0.01
    noise_strength: float = 1.0

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Build from a saved config (config.json), refusing one that `save_pretrained` of this class did not write:
        not a JSON object, another model_type, a field of ours missing, or a field nobody knows (a typo would
        otherwise be ignored silently). Field types and values are checked by the class itself."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"A {cls.__name__} must be a JSON object, got {type(config_dict).__name__}.")
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"This config is for model_type {model_type!r}, not {cls.model_type!r}: it does not describe a "
                "MetaPerturb perturbation function."
            )
        common = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        own = [f.name for f in dataclasses.fields(cls) if f.name not in common]
        required = [name for name in own if name not in cls.optional_fields]
        missing = [name for name in required if name not in config_dict and name not in kwargs]
        if missing:
            raise ValueError(f"The {cls.__name__} lacks {missing}; save_pretrained writes every field of {required}.")
        known = set(own) | common | set(PreTrainedConfig().to_dict())
        known |= {"auto_map", "torch_dtype", "name_or_path", "custom_pipelines"}
        unknown = sorted(key for key in config_dict if key not in known and not key.startswith("_"))
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, own, 1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ValueError(f"The {cls.__name__} has unknown field(s) {', '.join(hints)}; its fields are {own}.")
        return super().from_dict(config_dict, **kwargs)

    def validate_architecture(self):
        """Reject values that cannot build a perturbation function."""
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}.")
        if self.num_stat_filters < 1:
            raise ValueError(f"num_stat_filters must be at least 1, got {self.num_stat_filters}.")
        if not 0.0 < self.stat_momentum <= 1.0:
            raise ValueError(f"stat_momentum must lie in (0, 1], got {self.stat_momentum}.")
        if self.clip_value <= 0:
            raise ValueError(f"clip_value must be positive, got {self.clip_value}.")
        check_noise_strength(self.noise_strength)


__all__ = ["MetaPerturbConfig"]
