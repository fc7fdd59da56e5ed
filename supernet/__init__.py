"""GLoRA super-layer, search space, subnet objects and one-shot supernet training."""
from .space import LayerChoice, LayerSpec, SearchSpace, Subnet, canonical_choice, TENSORS
from .params import count_params, layer_params, tensor_params

__all__ = [
    "LayerChoice", "LayerSpec", "SearchSpace", "Subnet", "canonical_choice", "TENSORS",
    "count_params", "layer_params", "tensor_params",
]
