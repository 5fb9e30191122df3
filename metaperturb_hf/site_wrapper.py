"""Attaching to a classifier's sites with forward hooks: the wrapped model's module tree and its state-dict keys stay
untouched, and `unwrap()` removes the hooks. `PerturbedModel` and the baseline regularizers are `SiteWrapper`s."""

from collections.abc import Sequence

import torch
from torch import nn

from .perturbation_config import PerturbationConfig
from .sites import Site, default_example_inputs, find_sites, match_sites, select_sites, unique_keys


class _ModuleSitesHook:
    """One hook per (module, position): counts that module's calls once per forward and handles the calls that are
    sites.

    One counter per module matters when a module holds several sites (a shared ReLU called twice): a hook per site
    would advance the count once per site and call. A class rather than a closure, so wrappers deep-copy and pickle.
    """

    def __init__(self, owner: "SiteWrapper", module_name: str, position: str):
        self.owner, self.slot = owner, (module_name, position)
        self.sites: dict[int, tuple[Site, str]] = {}

    def _site_of_this_call(self):
        counts = self.owner._call_counts
        index = counts.get(self.slot, 0)
        counts[self.slot] = index + 1
        return self.sites.get(index)

    def before(self, module, args):
        hit = self._site_of_this_call()
        if hit is None:
            return None
        return (self.owner._perturb(*hit, args[0]),) + tuple(args[1:])

    def after(self, module, args, output):
        hit = self._site_of_this_call()
        return None if hit is None else self.owner._perturb(*hit, output)


class _ResetCallCounts:
    """Forward pre-hook on the wrapped model's root: a new forward starts counting calls from zero."""

    def __init__(self, owner: "SiteWrapper"):
        self.owner = owner

    def __call__(self, module, args, kwargs=None):
        self.owner._call_counts.clear()


def is_wrapped(model: nn.Module) -> bool:
    """Whether a perturbation or regularizer is attached to `model` (its root carries our reset hook)."""
    return any(isinstance(hook, _ResetCallCounts) for hook in model._forward_pre_hooks.values())


class SiteWrapper(nn.Module):
    """Hooks a classifier at its sites and hands every site tensor to `_perturb`; the tree and keys stay untouched.

    State-dict keys: `model.*` (the wrapped model's, unchanged) plus whatever a subclass registers.
    """

    def __init__(self, model: nn.Module, sites: Sequence[Site]):
        super().__init__()
        self.model = model
        self.sites = list(sites)
        self.site_keys = unique_keys([site.name for site in self.sites])
        self._call_counts: dict = {}
        self._handles = [model.register_forward_pre_hook(_ResetCallCounts(self))]
        self._unwrapped = False
        modules = dict(model.named_modules())
        hooks: dict[tuple[str, str], _ModuleSitesHook] = {}
        for site, key in zip(self.sites, self.site_keys):
            slot = (site.module_name, site.position)
            if slot not in hooks:
                hooks[slot] = hook = _ModuleSitesHook(self, *slot)
                module = modules[site.module_name]
                register = (module.register_forward_pre_hook if site.position == "input"
                            else module.register_forward_hook)
                self._handles.append(register(hook.before if site.position == "input" else hook.after))
            hooks[slot].sites[site.call_index] = (site, key)

    def forward(self, *args, **kwargs):
        if self._unwrapped:  # a flag, not the handles: torch.compile cannot trace a list of hook handles
            raise RuntimeError(f"This {type(self).__name__} was unwrapped; use the model that unwrap() returned.")
        return self.model(*args, **kwargs)

    def _perturb(self, site: Site, key: str, hidden_states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """Remove the hooks and return the original model (same keys, same outputs)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unwrapped = True
        return self.model


def refuse_wrapped(model: nn.Module) -> None:
    if is_wrapped(model):
        raise ValueError(
            f"This {type(model).__name__} already carries a perturbation or regularizer; call unwrap() on it first."
        )


def resolve_sites(
    model: nn.Module,
    config: PerturbationConfig,
    *,
    example_inputs=None,
    input_size: Sequence[int] | None = None,
) -> list[Site]:
    """The sites a wrapper attaches to by `config`: detected, matched by name or pattern, then selected."""
    refuse_wrapped(model)
    if example_inputs is None:
        example_inputs = default_example_inputs(model, input_size)
    detected = find_sites(model, example_inputs)
    if config.sites == "auto":
        if not detected:
            raise ValueError(
                f"No perturbation site found in {type(model).__name__}: it has no activation modules (nn.ReLU, ...) "
                "and no residual blocks. Pass sites=[...] with the names of modules whose outputs to perturb."
            )
        chosen = detected
    else:
        chosen = match_sites(model, example_inputs, detected, config.sites)
        if not chosen:
            raise ValueError(f"sites={config.sites!r} matched no site or module of {type(model).__name__}.")
    return select_sites(chosen, config)
