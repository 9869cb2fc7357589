"""Peak FLOP/s per accelerator and the MFU they give a measured throughput."""

from __future__ import annotations

from typing import Any

# Dense (no structured sparsity) bf16 peak FLOP/s per chip. Sources: Google Cloud TPU system
# architecture pages (cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: 275, 197, 459, 918 TFLOP/s
# bf16 per chip) and NVIDIA datasheets (A100: 312 TFLOP/s bf16 dense; H100 SXM5 and H200 SXM:
# 989 TFLOP/s bf16 dense, the often-quoted 1979 is with 2:4 sparsity; H100 PCIe: 756).
PEAK_FLOPS: dict[str, float] = {
    "tpu_v4": 275e12,
    "tpu_v5e": 197e12,
    "tpu_v5p": 459e12,
    "tpu_v6e": 918e12,
    "a100": 312e12,
    "h100_sxm": 989e12,
    "h100_pcie": 756e12,
    "h200": 989e12,
}


def _peak_key(device_kind: str) -> str | None:
    """Maps a `jax.Device.device_kind` string to a PEAK_FLOPS key (None when unknown)."""
    kind = " ".join(device_kind.lower().replace("-", " ").replace("_", " ").split())
    if "tpu" in kind:
        # Order matters: "TPU v5 lite" (v5e) must be matched before the bare "TPU v5" (v5p).
        if "v6" in kind:
            return "tpu_v6e" if ("lite" in kind or "v6e" in kind) else None
        if "v5" in kind:
            return "tpu_v5e" if ("lite" in kind or "v5e" in kind) else "tpu_v5p"
        if "v4" in kind:
            return None if "lite" in kind else "tpu_v4"
        return None
    if "h200" in kind:
        return "h200"
    if "h100" in kind:
        return "h100_pcie" if "pcie" in kind else "h100_sxm"
    if "a100" in kind:
        return "a100"
    return None


def peak_flops_per_device(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one device (a `jax.Device` or its device_kind string).

    None for CPUs and unknown accelerators, so callers print "n/a" instead of a made-up MFU.
    """
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    key = _peak_key(str(kind or ""))
    return PEAK_FLOPS[key] if key else None


def mfu(
    tokens_per_s: float, flops_per_token: float, num_devices: int, peak: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the devices' summed peak.

    `tokens_per_s` is the global throughput (all devices). None when the peak is unknown.
    """
    if peak is None or peak <= 0 or num_devices <= 0:
        return None
    return float(tokens_per_s) * float(flops_per_token) / (float(num_devices) * float(peak))


# Chip table for `lm plan`: name -> (dense bf16/fp16 peak FLOP/s, watts per chip, default list price
# $/chip-hour, HBM GiB). Peaks as in PEAK_FLOPS (V100: 125 TFLOP/s fp16 tensor, NVIDIA datasheet).
# Power: NVIDIA TDPs (V100 SXM2 300 W, A100 SXM 400 W, H100/H200 SXM 700 W); TPU v4 192 W max chip
# power (Jouppi et al. 2023, ISCA, Table 3); v5e/v5p/v6e power is not published by Google and the
# figures here are rough estimates. Prices: Google Cloud on-demand list prices (us-central, 2024:
# v4 $3.22, v5e $1.20, v5p $4.20, v6e $2.70 per chip-hour; GPUs per GPU-hour approximations of
# a2/a3 VM prices); override with --price_per_chip_hour. HBM: vendor pages.
CHIPS: dict[str, tuple[float, float, float, float]] = {
    "v4": (275e12, 192.0, 3.22, 32.0),
    "v5e": (197e12, 200.0, 1.20, 16.0),
    "v5p": (459e12, 350.0, 4.20, 95.0),
    "v6e": (918e12, 300.0, 2.70, 32.0),
    "v100": (125e12, 300.0, 2.48, 32.0),
    "a100": (312e12, 400.0, 3.67, 80.0),
    "h100": (989e12, 700.0, 11.06, 80.0),
    "h200": (989e12, 700.0, 13.0, 141.0),
}
# Cloud TPU v4/v5p names count TensorCores (2 per chip): v5p-256 is 128 chips. v5e/v6e names and
# the GPU names here (e.g. h100-64) count chips.
CORES_PER_CHIP_IN_NAME: dict[str, int] = {"v4": 2, "v5p": 2}
