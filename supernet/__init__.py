"""GLoRA super-layer, search space, subnet objects and the public library API (the supernet stage of a
run is ``glora.stages.supernet``).

The public API (see the README, "Use it as a library"; all of it lives in :mod:`supernet.api`)::

    from supernet import GloraSupernet, SearchSpace, Subnet, search_subnet, apply_subnet, merge_and_unload

The search-space objects import without torch; the names that need torch are loaded on first use.
"""
from .space import LayerChoice, LayerSpec, SearchSpace, Subnet, canonical_choice, TENSORS
from .params import count_params, layer_params, tensor_params

_API = ("GloraSupernet", "SearchResult", "Candidate", "search_subnet", "apply_subnet", "merge_and_unload",
        "adapter_parameters", "find_targets", "layer_specs", "classifier_names", "GloraLinear", "SuperGloraLinear")

__all__ = [
    "LayerChoice", "LayerSpec", "SearchSpace", "Subnet", "canonical_choice", "TENSORS",
    "count_params", "layer_params", "tensor_params", *_API,
]


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
