"""Dense bf16 peak FLOP/s and memory per accelerator chip (one JAX device), for MFU and the AOT fit check.

Figures are the vendors' published dense (not sparse) bf16 matrix peaks:
TPU v4 275 TFLOP/s, 32 GiB HBM (cloud.google.com/tpu/docs/v4); v5e 197, 16 GiB (/v5e); v5p 459, 95 GiB (/v5p);
v6e (Trillium) 918, 32 GiB (/v6e); NVIDIA A100 312 (A100 datasheet, SXM and PCIe); H100 SXM 989 and H100 PCIe 756
(H100 datasheet: 1,979 / 1,513 with sparsity); H200 989 (H200 datasheet); B200 2,250 (HGX B200: 4.5 PFLOP/s
with sparsity). GPU memory is read from the device at run time.
"""

import dataclasses

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # dense, per chip (= per JAX device: TPU v4 / v5p megacore, one GPU)
    hbm_bytes: int | None  # None: ask the device


# (device_kind as JAX reports it: exact for TPUs, a substring for GPUs) -> Chip; the first match wins
_TPUS = {
    "TPU v4": Chip("TPU v4", 275e12, 32 * GiB),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 16 * GiB),
    "TPU v5e": Chip("TPU v5e", 197e12, 16 * GiB),
    "TPU v5": Chip("TPU v5p", 459e12, 95 * GiB),
    "TPU v5p": Chip("TPU v5p", 459e12, 95 * GiB),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 32 * GiB),
    "TPU v6e": Chip("TPU v6e", 918e12, 32 * GiB),
}
_GPUS = (
    ("H100 PCIe", Chip("NVIDIA H100 PCIe", 756e12, None)),
    ("H100", Chip("NVIDIA H100 SXM", 989e12, None)),
    ("H200", Chip("NVIDIA H200", 989e12, None)),
    ("B200", Chip("NVIDIA B200", 2250e12, None)),
    ("A100", Chip("NVIDIA A100", 312e12, None)),
)
TOPOLOGY_PREFIXES = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def chip_for(device_kind: str) -> Chip | None:
    """The table entry for a JAX device_kind, or None (CPUs, unlisted chips: no MFU)."""
    if device_kind in _TPUS:
        return _TPUS[device_kind]
    for needle, chip in _GPUS:
        if needle in device_kind:
            return chip
    return None
