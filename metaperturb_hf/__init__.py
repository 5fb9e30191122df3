"""MetaPerturb for the Hugging Face ecosystem: a transferable, meta-learned perturbation regularizer."""

import importlib
import importlib.util
import pkgutil

from transformers import AutoConfig, AutoModel

from ._version import __version__
from .configuration_metaperturb import MetaPerturbConfig
from .convert import convert_official_checkpoint, convert_official_classifier
from .injection import PerturbedModel, add_perturbation
from .loading import load_perturbation
from .modeling_metaperturb import MetaPerturbModel, NonFiniteFeaturesError
from .perturbation_config import PerturbationConfig
from .sites import Site, find_sites

AutoConfig.register(MetaPerturbConfig.model_type, MetaPerturbConfig, exist_ok=True)
AutoModel.register(MetaPerturbConfig, MetaPerturbModel, exist_ok=True)
# Saved folders carry auto_map and the modeling code, so trust_remote_code works where this package is absent.
MetaPerturbConfig.register_for_auto_class()
MetaPerturbModel.register_for_auto_class("AutoModel")

__all__ = [
    "__version__",
    "MetaPerturbConfig",
    "MetaPerturbModel",
    "NonFiniteFeaturesError",
    "PerturbationConfig",
    "PerturbedModel",
    "Site",
    "add_perturbation",
    "convert_official_checkpoint",
    "convert_official_classifier",
    "find_sites",
    "load_perturbation",
]


def __getattr__(name: str):
    """A submodule on first use (`metaperturb_hf.architectures.create_model(...)`), as transformers does: `import
    metaperturb_hf` stays as fast as it is and does not load what only some users need (`datasets`, the
    meta-trainer)."""
    if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {module.name for module in pkgutil.iter_modules(__path__)})
