"""MetaPerturb for the Hugging Face ecosystem: a transferable, meta-learned perturbation regularizer."""

from transformers import AutoConfig, AutoModel

from .configuration_metaperturb import MetaPerturbConfig
from .convert import convert_official_checkpoint, convert_official_classifier
from .injection import PerturbedModel, Site, add_perturbation, find_sites
from .modeling_metaperturb import MetaPerturbModel

__version__ = "0.1.0"

AutoConfig.register(MetaPerturbConfig.model_type, MetaPerturbConfig, exist_ok=True)
AutoModel.register(MetaPerturbConfig, MetaPerturbModel, exist_ok=True)
# Saved folders carry auto_map and the modeling code, so trust_remote_code works where this package is absent.
MetaPerturbConfig.register_for_auto_class()
MetaPerturbModel.register_for_auto_class("AutoModel")

__all__ = [
    "MetaPerturbConfig",
    "MetaPerturbModel",
    "PerturbedModel",
    "Site",
    "add_perturbation",
    "convert_official_checkpoint",
    "convert_official_classifier",
    "find_sites",
]
