"""The gates of stage 2: one learnable score per layer scaling that layer's LoRA update.

ILA (Shi et al., arXiv 2410.17875) relaxes the binary layer mask gamma in {0,1}^N of

    min_gamma  L_D(theta_0 + gamma (.) Delta)   s.t.  ||gamma||_0 <= H

to gamma_i = sigmoid(s_i) and learns the scores s by gradient descent. For a LoRA layer the gated forward is

    y = W_0 x + sigmoid(s_i) * scaling * B_i A_i x

which is implemented here by a forward hook on the layer's ``lora_A`` that multiplies its output, the r-wide
``A_i x``, by the gate: ``B_i (g A_i x) = g B_i A_i x`` because B_i is linear, and the multiply (and the
tensor autograd keeps for the gate's gradient) is r values per token instead of the layer's whole output
width, 24 to 192 times fewer on SmolLM2 at r = 8. The gate's gradient is then
``<B_i^T dL/dy, A_i x>``, from the product ``B_i^T dL/dy`` that the backward pass computes anyway for the
input's gradient. peft adds ``lora_B(lora_A(x)) * scaling`` to the base output, so a gate of exactly 1
reproduces the plain peft model bit for bit and a gate of exactly 0 reproduces the base model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ModelError
from .layers import PEFT_PREFIX, lora_adapter_name, unwrap
from .stability import bias_key


class LayerGates(nn.Module):
    """The N scores s, keyed by layer name; ``gates()`` is sigmoid(s)."""

    def __init__(
        self, layer_names: Sequence[str], *, init_mean: float = 0.0, init_std: float = 0.01, seed: int = 0
    ):
        super().__init__()
        if len(set(layer_names)) != len(layer_names):
            raise ValueError("layer names must be unique")
        self.layer_names = list(layer_names)
        self.index = {name: i for i, name in enumerate(self.layer_names)}
        # [spec] s_0 = init_mean + N(0, init_std) from the run's seed: the paper reports the ranking to be
        # stable across gate initialisations; the noise breaks exact ties between layers.
        g = torch.Generator().manual_seed(seed)
        init = init_mean + init_std * torch.randn(len(self.layer_names), generator=g)
        self.scores = nn.Parameter(init)  # (N,)
        # When set, these gate values replace sigmoid(s) (for equivalence checks and ablations).
        self.fixed: torch.Tensor | None = None

    def gates(self) -> torch.Tensor:
        """gamma = sigmoid(s), shape (N,)."""
        if self.fixed is not None:
            return self.fixed.to(self.scores.device)
        return torch.sigmoid(self.scores)

    def gate(self, i: int) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed[i].to(self.scores.device)
        return torch.sigmoid(self.scores[i])

    def set_fixed(self, values: float | torch.Tensor | None) -> None:
        """Pin every gate to ``values`` (a number or an (N,) tensor); ``None`` returns to sigmoid(s)."""
        if values is None:
            self.fixed = None
        else:
            self.fixed = torch.as_tensor(values, dtype=torch.float32).expand(len(self.layer_names)).clone()

    def budget_penalty(self, budget_fraction: float) -> torch.Tensor:
        """[spec] max(0, mean(gamma) - H/N): zero while the gates, on average, stay within the budget."""
        return torch.clamp(self.gates().mean() - budget_fraction, min=0.0)

    def as_dict(self) -> dict[str, float]:
        return {
            n: float(s) for n, s in zip(self.layer_names, self.scores.detach().cpu().tolist(), strict=True)
        }


class ScoreSGD(torch.optim.Optimizer):
    """Plain SGD on the scores, with every step divided by the largest score gradient of the first step.

    [spec] Stage 2's scores take gradients sigmoid'(s_i) <grad_W L, Delta_i>, whose size is set by the model
    (its width, depth and loss scale): one fixed SGD learning rate moves SmolLM2's scores by 0.05 in 30 steps
    and a tiny model's to |s| = 48 in 5, where the gates saturate, sigmoid' vanishes and the first batches
    freeze the ranking. Dividing by one constant G = max_i |g_1,i| makes ``lr`` the largest score move of the
    first step on every model, and keeps what plain SGD has and Adam lacks: each score still moves by its own
    cumulative gradient (one constant for every layer, so their order is plain SGD's), and a zero update gets
    a zero gradient and stays where it started. G lives in the optimiser state, so a resumed run uses the same
    G. With ``normalise=False`` this is plain SGD.
    """

    def __init__(self, params, lr: float, normalise: bool = True):  # noqa: ANN001
        super().__init__(params, {"lr": lr, "normalise": normalise})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["normalise"]:
                    state = self.state[p]
                    if "scale" not in state:
                        largest = grad.abs().max()
                        if largest == 0:  # nothing to measure yet (every update zero): nothing moves either
                            continue
                        state["scale"] = largest.clone()
                    grad = grad / state["scale"]
                p.add_(grad, alpha=-group["lr"])
        return loss


class GateHooks:
    """The forward hooks that apply the gates; ``remove()`` restores the plain peft model."""

    def __init__(
        self, handles: list[torch.utils.hooks.RemovableHandle], buffers: list[nn.Module] | None = None
    ):
        self.handles = handles
        self.buffers = buffers or []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module in self.buffers:  # the stored full-weight updates
            module._buffers.pop("ila_delta", None)
            module._buffers.pop("ila_delta_bias", None)
        self.buffers.clear()


def attach_gates(peft_model: nn.Module, gates: LayerGates, adapter_name: str | None = None) -> GateHooks:
    """Gate the LoRA update of every layer named in ``gates`` and register ``gates`` on the model.

    ``adapter_name`` defaults to the one active, unmerged adapter of those layers (any name; see
    :func:`ila.layers.lora_adapter_name`, which refuses several active adapters and merged ones).
    Registering the scores as a submodule (``ila_gates``) makes them ordinary parameters of the model, so
    the Trainer's optimiser, DDP's gradient averaging and device placement treat them like any other.
    """
    if adapter_name is None:
        adapter_name = lora_adapter_name(peft_model, gates.layer_names)
    modules = dict(peft_model.named_modules())
    handles = []
    missing = []
    for i, name in enumerate(gates.layer_names):
        module = modules.get(PEFT_PREFIX + name)
        lora_a = getattr(module, "lora_A", None) if module is not None else None
        if lora_a is None or adapter_name not in lora_a:
            missing.append(name)
            continue
        if adapter_name in getattr(module, "lora_variant", {}):
            raise ModelError(f"{name} uses a LoRA variant (e.g. DoRA); ILA gates support plain LoRA only")

        def hook(_mod: nn.Module, _inp: tuple, out: torch.Tensor, i: int = i) -> torch.Tensor:
            return out * gates.gate(i).to(out.dtype)

        handles.append(lora_a[adapter_name].register_forward_hook(hook))
    if missing:
        for h in handles:
            h.remove()
        raise ModelError(
            f"{len(missing)} of {len(gates.layer_names)} layers carry no LoRA adapter, e.g. {missing[0]}; "
            "the adapter does not match the layers being gated"
        )
    peft_model.add_module("ila_gates", gates)
    return GateHooks(handles)


def attach_update_gates(model: nn.Module, gates: LayerGates, deltas: dict[str, torch.Tensor]) -> GateHooks:
    """Gate full-weight updates: layer i computes ``W_0 x + b_0 + sigmoid(s_i) * (Delta_i x + delta_b_i)``
    with Delta_i = W_T - W_0 under the layer's name in ``deltas`` and the bias update b_T - b_0 under
    :func:`ila.stability.bias_key` (the full fine-tuning form of ILA, which trains biases too); ``model``
    holds W_0. A gate of 0 gives the base model exactly, a gate of 1 the fine-tuned model up to float
    rounding of the split product."""
    modules = dict(unwrap(model).named_modules())
    handles: list[torch.utils.hooks.RemovableHandle] = []
    owners: list[nn.Module] = []
    for i, name in enumerate(gates.layer_names):
        module = modules.get(name)
        if module is None or name not in deltas:
            for h in handles:
                h.remove()
            raise ModelError(f"no full-weight update for layer {name}")
        delta = deltas[name].to(device=module.weight.device, dtype=module.weight.dtype)
        if tuple(delta.shape) != tuple(module.weight.shape):
            raise ModelError(
                f"{name}: update of shape {tuple(delta.shape)} for a weight of {tuple(module.weight.shape)}"
            )
        module.register_buffer("ila_delta", delta, persistent=False)
        bias_delta = deltas.get(bias_key(name))
        if bias_delta is not None:
            module.register_buffer(
                "ila_delta_bias",
                bias_delta.to(device=module.weight.device, dtype=module.weight.dtype),
                persistent=False,
            )
        transposed = type(module).__name__ == "Conv1D"  # GPT-2 stores (d_in, d_out)

        def hook(
            mod: nn.Module, inp: tuple, out: torch.Tensor, i: int = i, transposed: bool = transposed
        ) -> torch.Tensor:
            x = inp[0]
            update = x @ mod.ila_delta if transposed else nn.functional.linear(x, mod.ila_delta)
            if getattr(mod, "ila_delta_bias", None) is not None:
                update = update + mod.ila_delta_bias
            return out + gates.gate(i).to(out.dtype) * update

        handles.append(module.register_forward_hook(hook))
        owners.append(module)
    model.add_module("ila_gates", gates)
    return GateHooks(handles, owners)
