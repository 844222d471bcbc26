"""LoRA fine-tuning of the attention and MLP projections, and merging the adapters into the base weights.

`apply_lora(model, rank, alpha, targets)` swaps every decoder-layer projection named in `targets`
(wq, wk_v, wo of attention; w1, w3, w2 of feed_forward) for a `LoRALinear`:
    y = x W^T (+ b) + (alpha / rank) * (x A^T) B^T,   A [r, in], B [out, r]
A starts uniform in +-1/sqrt(in) (PEFT's kaiming-uniform bound), B at zero, so the wrapped model computes
exactly the base model until B moves. The base weight and bias stay the same Parameter objects under the
same names (`...attention.wq.weight`); the adapters are `...attention.wq.lora_a` / `.lora_b`. Every
parameter except the adapters gets requires_grad=False, so `model.trainable_params()` is the adapters only.

`merge_lora(model)` folds W <- W + (alpha / rank) * B A (in fp32) and swaps the plain `Linear` back, so the
merged model has exactly the base model's parameter names and loads anywhere a full checkpoint does.
LoRA dropout (0.05 in the official recipe) is not implemented: dropout makes resuming depend on device RNG
state; set it aside here and the adapters train deterministically.
"""
from __future__ import annotations

import math
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from mindspore import Parameter, Tensor, nn, ops

from telechat2_ms import kernels
from telechat2_ms.layers import Linear, ParamInit

LORA_TARGETS = {"wq": "attention", "wk_v": "attention", "wo": "attention",
                "w1": "feed_forward", "w3": "feed_forward", "w2": "feed_forward"}


class LoRALinear(nn.Cell):
    """A frozen `Linear` plus a trainable low-rank update; x [..., in] -> [..., out]."""

    def __init__(self, base: Linear, rank: int, alpha: float, lora_a: np.ndarray):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.has_bias, self.compute_dtype = base.has_bias, base.compute_dtype
        self.weight = base.weight  # [out, in], the base Parameter itself
        self.bias = base.bias
        self.matmul = base.matmul  # the named primitive a parallel plan may shard
        self.rank, self.alpha = rank, alpha
        self.scaling = float(alpha) / rank
        self.lora_a = Parameter(Tensor(lora_a), name="lora_a")  # [r, in] (lora_a_draws)
        self.lora_b = Parameter(Tensor(np.zeros((self.out_features, rank), np.float32)), name="lora_b")  # [out, r]
        self.lora_matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        lead = x.shape[:-1]
        x2d = ops.reshape(ops.cast(x, self.compute_dtype), (-1, x.shape[-1]))  # [N, in]
        y = kernels.weight_matmul(self.matmul, x2d, kernels.cast_to(self.weight, self.compute_dtype))
        if self.has_bias:
            y = y + ops.cast(self.bias, self.compute_dtype)
        low = self.lora_matmul(x2d, ops.cast(self.lora_a, self.compute_dtype))  # [N, r]
        low = self.lora_matmul(low, ops.cast(self.lora_b, self.compute_dtype))  # [N, out]
        y = y + low * self.scaling
        return ops.reshape(y, lead + (self.out_features,))

    def merged_weight(self) -> np.ndarray:
        """W + scaling * B A in fp32 numpy [out, in]."""
        delta = self.lora_b.asnumpy().astype(np.float64) @ self.lora_a.asnumpy().astype(np.float64)
        return (self.weight.asnumpy().astype(np.float64) + self.scaling * delta).astype(np.float32)


def lora_a_draws(cfg, rank: int, targets: Sequence[str], seed: int = 0) -> Iterator[Tuple[str, np.ndarray]]:
    """(projection path, its initial A [r, in] fp32) for every decoder layer and target in order, from one
    seeded generator: uniform in +-1/sqrt(in). One process and every parallel layout (which keeps its slices of
    its own layers' draws) start from the same adapters."""
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {sorted(LORA_TARGETS)}")
    rng = np.random.default_rng(seed)
    in_features = {"wo": cfg.num_heads * cfg.head_dim, "w2": cfg.ffn_hidden_size}
    for i in range(cfg.num_layers):
        for t in targets:
            n = in_features.get(t, cfg.hidden_size)
            bound = 1.0 / math.sqrt(n)
            yield f"model.layers.{i}.{LORA_TARGETS[t]}.{t}", rng.uniform(-bound, bound, (rank, n)).astype(np.float32)


def _get(root: nn.Cell, path: str) -> nn.Cell:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _set(root: nn.Cell, path: str, cell: nn.Cell) -> None:
    parent_path, leaf = path.rsplit(".", 1)
    setattr(_get(root, parent_path), leaf, cell)


def sync_parameter_names(model: nn.Cell) -> None:
    """Parameter.name = its attribute path, also for cells swapped in after construction."""
    for name, param in model.parameters_and_names():
        param.name = name


def apply_lora(model, rank: int, alpha: float, targets: Sequence[str], seed: int = 0) -> List[str]:
    """Wrap the target projections (module docstring) and freeze everything else; returns adapter names."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if not targets:
        raise ValueError("LoRA needs at least one target projection (train.lora_targets)")
    for path, lora_a in lora_a_draws(model.config, rank, targets, seed):
        base = _get(model, path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already has a LoRA adapter")
        if not isinstance(base, Linear):
            raise ValueError(f"{path} is a {type(base).__name__}, LoRA wraps plain Linear layers only")
        _set(model, path, LoRALinear(base, rank, alpha, lora_a))
    sync_parameter_names(model)
    names = []
    for name, param in model.parameters_and_names():
        is_adapter = _is_adapter(name)
        param.requires_grad = is_adapter
        if is_adapter:
            names.append(name)
    return names


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b"))


def lora_cells(model) -> Dict[str, LoRALinear]:
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, LoRALinear)}


def lora_state(model) -> Dict[str, Parameter]:
    """{name: Parameter} of the adapters."""
    return {name: p for name, p in model.parameters_and_names() if _is_adapter(name)}


def merged_state(model) -> Dict[str, object]:
    """{name: Tensor | Parameter} of the plain (merged) model without changing `model`: adapters folded into
    their base weights, adapter tensors left out. For a model without adapters: its parameters."""
    merged = {f"{path}.weight": cell.merged_weight() for path, cell in lora_cells(model).items()}
    state = {}
    for name, param in model.parameters_and_names():
        if not _is_adapter(name):
            state[name] = Tensor(merged[name]) if name in merged else param
    return state


def merge_lora(model) -> int:
    """Fold every adapter into its base weight and restore plain Linear cells (all parameters trainable
    again); returns the number of merged projections."""
    cells = lora_cells(model)
    for path, cell in cells.items():
        plain = Linear(cell.in_features, cell.out_features, cell.has_bias, ParamInit(zeros=True), cell.compute_dtype)
        cell.weight.set_data(Tensor(cell.merged_weight()).astype(cell.weight.dtype))
        plain.weight = cell.weight
        if cell.has_bias:
            plain.bias = cell.bias
        plain.matmul = cell.matmul
        _set(model, path, plain)
    sync_parameter_names(model)
    for param in model.get_parameters():
        param.requires_grad = True
    return len(cells)


__all__ = ["LoRALinear", "apply_lora", "lora_a_draws", "lora_state", "merge_lora", "merged_state",
           "sync_parameter_names"]
