"""Epsilon-stability of stage 1: how much the LoRA updates still move.

The paper (Shi et al., arXiv 2410.17875) shows that once training is epsilon-stable the important layers no
longer change, so stage 1 may stop early. [spec] This project measures it, for the model as a whole, as

    r_t = ||Delta_t - Delta_{t-w}||_F / ||Delta_t||_F,      Delta = scaling * B @ A  (every layer stacked)

and calls the run stable at step t when r_t <= epsilon. The Frobenius norms are computed from the small
factors without forming any d_out x d_in matrix:

    ||B A||_F^2 = tr((B^T B)(A A^T)),    <B A, B' A'>_F = tr((B^T B')(A' A^T))

which costs O(r^2 (d_in + d_out)) per layer instead of O(d_in d_out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import PEFT_PREFIX, lora_adapter_name, unwrap


@dataclass
class LoraFactors:
    """A detached copy of every layer's (scaling, A, B)."""

    factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]]

    @classmethod
    def snapshot(
        cls, peft_model: nn.Module, layer_names: list[str], adapter: str | None = None
    ) -> LoraFactors:
        """``adapter`` defaults to the one active adapter of the layers
        (:func:`ila.layers.lora_adapter_name`)."""
        if adapter is None:
            adapter = lora_adapter_name(peft_model, layer_names)
        modules = dict(peft_model.named_modules())
        out = {}
        for name in layer_names:
            m = modules[PEFT_PREFIX + name]
            a = m.lora_A[adapter].weight.detach().float().clone()  # (r, d_in)
            b = m.lora_B[adapter].weight.detach().float().clone()  # (d_out, r)
            out[name] = (float(m.scaling[adapter]), a, b)
        return cls(out)


def _inner(
    s1: float, a1: torch.Tensor, b1: torch.Tensor, s2: float, a2: torch.Tensor, b2: torch.Tensor
) -> float:
    """<s1 B1 A1, s2 B2 A2>_F = s1 s2 tr((B1^T B2)(A2 A1^T))."""
    return s1 * s2 * float(torch.trace((b1.T @ b2) @ (a2 @ a1.T)))


def update_norms(f: LoraFactors) -> dict[str, float]:
    """||Delta_i||_F of every layer."""
    return {n: max(0.0, _inner(s, a, b, s, a, b)) ** 0.5 for n, (s, a, b) in f.factors.items()}


def relative_change(prev: LoraFactors, cur: LoraFactors) -> tuple[float, dict[str, float]]:
    """(r_t for the whole model, per-layer relative change) between two snapshots."""
    total_diff = total_cur = 0.0
    per_layer = {}
    for name, (s, a, b) in cur.factors.items():
        sp, ap, bp = prev.factors[name]
        cc = _inner(s, a, b, s, a, b)
        pp = _inner(sp, ap, bp, sp, ap, bp)
        cp = _inner(s, a, b, sp, ap, bp)
        diff = max(0.0, cc + pp - 2 * cp)
        total_diff += diff
        total_cur += cc
        per_layer[name] = (diff / cc) ** 0.5 if cc > 0 else float("inf") if diff > 0 else 0.0
    overall = (total_diff / total_cur) ** 0.5 if total_cur > 0 else (float("inf") if total_diff > 0 else 0.0)
    return overall, per_layer


def bias_key(layer_name: str) -> str:
    """The key of a layer's bias in a full-weight snapshot or update (its weight is keyed by the layer
    name)."""
    return f"{layer_name}.bias"


def weight_snapshot(model: nn.Module, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """A detached copy of every layer's full weight, and its bias under :func:`bias_key` (full fine-tuning
    trains both, so both are part of the layer's update W_T - W_0)."""
    modules = dict(unwrap(model).named_modules())
    out = {}
    for n in layer_names:
        out[n] = modules[n].weight.detach().float().clone()
        bias = getattr(modules[n], "bias", None)
        if bias is not None:
            out[bias_key(n)] = bias.detach().float().clone()
    return out


def full_update_norm(update: dict[str, torch.Tensor], layer_name: str) -> float:
    """||Delta_i||_F of a full-weight update: weight and bias together."""
    total = float(update[layer_name].float().pow(2).sum())
    if bias_key(layer_name) in update:
        total += float(update[bias_key(layer_name)].float().pow(2).sum())
    return total**0.5


def relative_change_full(
    base: dict[str, torch.Tensor], prev: dict[str, torch.Tensor], cur: dict[str, torch.Tensor]
) -> float:
    """r_t for full fine-tuning: ||W_t - W_{t-w}||_F / ||W_t - W_0||_F over all layers stacked."""
    diff = sum(float((cur[n] - prev[n]).pow(2).sum()) for n in cur)
    total = sum(float((cur[n] - base[n]).pow(2).sum()) for n in cur)
    if total == 0:
        return float("inf") if diff > 0 else 0.0
    return (diff / total) ** 0.5
