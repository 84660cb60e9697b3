"""The machine a measurement was made on, kept with every strategy run.

Step times depend on it, and losses can: bf16 and fp32 kernels accumulate in different orders on different
CPUs and GPUs. (Seed 0 of SmolLM2's converged `all-rank-3`, trained again under bf16 on a second CPU with
AVX-512 BF16, landed 0.00005 from its first run, far below the spread of seeds; other pairs of machines
were not measured.) A comparison that pairs runs by seed compares like with like only while each seed's
runs share a machine, so the strategy report names the machines when its runs come from more than one
(:func:`ila.strategy_report.render_markdown`).
"""

from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

from .precision import bf16_is_native

# the CPU features that decide how fast (and through which kernels) bf16 and fp32 matmuls run
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpu(cpuinfo: Path) -> tuple[str, list[str] | None]:
    """The CPU's model name and which of :data:`_FLAGS` it has (Linux's /proc/cpuinfo; elsewhere the
    platform's processor string, and None: not known)."""
    name, flags = "", set()
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return name or platform.processor() or platform.machine(), [f for f in _FLAGS if f in flags]


def describe_machine(device: str = "auto", cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU (model name, the bf16-relevant flags, cores), the GPU where ``device`` (as in
    ``model.device``) is CUDA, whether it multiplies bf16 natively, and the torch build."""
    import torch

    cpu, flags = _cpu(cpuinfo)
    gpu = None
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        index = int(device.split(":")[1]) if ":" in device else 0
        gpu = torch.cuda.get_device_name(index) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "bf16_native": bf16_is_native(device),
        "torch": torch.__version__,
    }


def machine_label(machine: dict[str, Any] | None) -> str:
    """One line naming ``machine`` (:func:`describe_machine`); runs that predate the record: "not
    recorded"."""
    if not machine:
        return "not recorded"
    if machine.get("gpu"):
        return f"{machine['gpu']} (torch {machine['torch']})"
    known = machine.get("cpu_flags")
    flags = "flags not known" if known is None else ", ".join(known) or "no AVX2"
    return f"{machine['cpu']} ({flags}), {machine['cpu_count']} cores (torch {machine['torch']})"


def peak_resident_mb() -> float:
    """The most resident memory this process has held, in MiB: Linux's ``VmHWM``, which belongs to the
    process's own address space. ``getrusage``'s ``ru_maxrss`` is not that: it is kept across ``exec``, so a
    process started by spawn (fork, then exec) reports at least the resident size its parent had when it
    started it, and an isolated fine-tune started by a process that had just scored a model reported the
    scorer's peak. Elsewhere (no ``/proc``) ``ru_maxrss`` is all there is."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
