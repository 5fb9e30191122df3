"""Where φ goes and how it runs, as one validated, saveable object (as PEFT's `LoraConfig` is for LoRA).

`add_perturbation` and `add_regularizer` read it; `PerturbedModel.save_pretrained` writes it as
`perturbation_config.json` beside the sites it resolved to, with a format version and the package version, so a
folder written by a newer, incompatible release is refused instead of misread.
"""

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from ._version import __version__
from .hub import local_file

CONFIG_NAME = "perturbation_config.json"
# Raise when a saved field changes meaning or a new one is required; readers refuse newer formats.
FORMAT_VERSION = 1
SELECT_MODES = ("all", "bottom", "top", "top_bottom")
NOISE_MODES = ("sample", "mean")
# The fields that say where the sites are; a regularizer reads only these.
PLACEMENT_FIELDS = ("sites", "select", "num_sites")


@dataclass(frozen=True)
class PerturbationConfig:
    r"""
    Where φ is plugged into a classifier and how it runs there (docs/sites.md).

    Args:
        sites: `"auto"` (the rules of docs/sites.md), a regex matched in full against site names (or, if none
            matches, module names, whose outputs are then perturbed), or a list of site or module names.
        select: among the chosen sites keep `"all"`, the `"bottom"`/`"top"` `num_sites` (first / last in forward
            order), or `"top_bottom"` (`num_sites` at each end): the paper's ablations.
        num_sites: how many sites `select` keeps at each chosen end; only with a `select` other than `"all"`.
        channel_norm, spatial_norm: C_norm and H_norm of the site descriptors C / C_norm and H / H_norm; None (the
            default) takes the largest channel count and spatial size among the chosen sites.
        noise_mode: evaluation noise, `"sample"` (fresh draws, as the authors) or `"mean"` (deterministic single
            pass); `PerturbedModel.set_noise_mode` changes it later.
    """

    sites: str | tuple[str, ...] = "auto"
    select: str = "all"
    num_sites: int | None = None
    channel_norm: float | None = None
    spatial_norm: float | None = None
    noise_mode: str = "sample"

    def __post_init__(self):
        object.__setattr__(self, "sites", _checked_sites(self.sites))
        if self.select not in SELECT_MODES:
            raise ValueError(f"PerturbationConfig.select must be one of {SELECT_MODES}, got {self.select!r}.")
        if self.select == "all":
            if self.num_sites is not None:
                raise ValueError(
                    f"PerturbationConfig.num_sites={self.num_sites!r} needs select='bottom', 'top' or "
                    "'top_bottom'; with select='all' every chosen site is kept, so leave num_sites None."
                )
        elif isinstance(self.num_sites, bool) or not isinstance(self.num_sites, int) or self.num_sites < 1:
            raise ValueError(
                f"PerturbationConfig.select={self.select!r} needs num_sites, an integer >= 1 (how many sites to keep "
                f"at each chosen end), got {self.num_sites!r}."
            )
        for name in ("channel_norm", "spatial_norm"):
            object.__setattr__(self, name, _checked_norm(name, getattr(self, name)))
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"PerturbationConfig.noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}.")

    @classmethod
    def build(cls, config: "PerturbationConfig | None" = None, **overrides) -> "PerturbationConfig":
        """`config`, or one made from keyword fields; both at once is refused, since which wins would be a guess."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"Unknown PerturbationConfig field(s) {unknown}; its fields are {known}.")
        if config is None:
            return cls(**overrides)
        if not isinstance(config, cls):
            raise TypeError(f"config must be a PerturbationConfig, got {type(config).__name__}.")
        if overrides:
            example = next(iter(overrides))
            raise TypeError(
                f"Pass config= or the keyword fields {sorted(overrides)}, not both: to change a field of a config, "
                f"pass dataclasses.replace(config, {example}=...)."
            )
        return config

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "metaperturb_hf_version": __version__,
            **{f.name: list(value) if isinstance(value := getattr(self, f.name), tuple) else value
               for f in fields(self)},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PerturbationConfig":
        """What `to_dict` wrote; refuses another format version and fields nobody knows (a typo would vanish)."""
        if not isinstance(data, dict):
            raise ValueError(f"A PerturbationConfig must be a JSON object, got {type(data).__name__}.")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(
                f"This PerturbationConfig has no integer format_version (got {version!r}); it was not written by "
                "PerturbationConfig.save_pretrained."
            )
        if version > FORMAT_VERSION:
            raise ValueError(
                f"This PerturbationConfig is in format {version}, written by metaperturb_hf "
                f"{data.get('metaperturb_hf_version', '?')}; this metaperturb_hf ({__version__}) reads formats up to "
                f"{FORMAT_VERSION}: upgrade metaperturb_hf."
            )
        values = {key: value for key, value in data.items() if key not in ("format_version", "metaperturb_hf_version")}
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"This PerturbationConfig has unknown field(s) {unknown}; its fields are {known}.")
        return cls(**values)

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write `perturbation_config.json` into `save_directory` and return its path."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, revision: str | None = None,
                        token: str | None = None) -> "PerturbationConfig":
        """The config saved in a local folder or a hub repo."""
        path = local_file(path_or_repo_id, CONFIG_NAME, revision=revision, token=token)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}).") from error
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{path}: {error}") from error


def _checked_sites(sites) -> str | tuple[str, ...]:
    if isinstance(sites, str):
        if sites != "auto":
            try:
                re.compile(sites)
            except re.error as error:
                raise ValueError(f"PerturbationConfig.sites={sites!r} is not a valid regular expression: "
                                 f"{error}.") from None
        return sites
    if isinstance(sites, (list, tuple)) and sites and all(isinstance(name, str) and name for name in sites):
        if len(set(sites)) != len(sites):
            raise ValueError(f"PerturbationConfig.sites lists a name twice: {list(sites)}.")
        return tuple(sites)
    raise TypeError(
        "PerturbationConfig.sites must be 'auto', a regex string or a non-empty list of site or module names, "
        f"got {sites!r}."
    )


def _checked_norm(name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"PerturbationConfig.{name} must be a positive number, or None for the largest value among the chosen "
            f"sites, got {value!r}."
        )
    return float(value)


__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "PerturbationConfig"]
