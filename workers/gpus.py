"""GPU discovery through NVML, with a CPU fallback and a seam for tests (NATS_NOTES section 9).

NVML's free memory counts every process on the card, which is what placement needs. Indices are never
used: a GPU is its UUID. `FLEET_FAKE_GPUS` (a JSON list of GpuInfo fields) replaces NVML entirely, so
tests can place tasks on an H100 and a 4090 that are not there.
"""

from __future__ import annotations

import json
import os

import msgspec

from schemas.messages import GpuInfo

FAKE_ENV = "FLEET_FAKE_GPUS"


def discover() -> list[GpuInfo]:
    """Every GPU on this machine, in NVML (PCI bus) order; [] without a driver."""
    fake = os.environ.get(FAKE_ENV)
    if fake:
        try:
            return msgspec.convert(json.loads(fake), list[GpuInfo])
        except (ValueError, msgspec.ValidationError) as e:
            raise ValueError(f"{FAKE_ENV} is not a JSON list of GPUs: {e}") from None
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []  # no driver: a CPU box
    try:
        return [
            _info(pynvml, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())
        ]
    finally:
        pynvml.nvmlShutdown()


def query(uuid: str) -> GpuInfo:
    """Fresh memory and utilisation of one GPU, by UUID."""
    if os.environ.get(FAKE_ENV):
        for gpu in discover():
            if gpu.uuid == uuid:
                return gpu
        raise LookupError(f"GPU {uuid} is not in {FAKE_ENV}")
    import pynvml

    pynvml.nvmlInit()
    try:
        return _info(pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid))
    finally:
        pynvml.nvmlShutdown()


def _info(pynvml, handle) -> GpuInfo:  # type: ignore[no-untyped-def]
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        util: float | None = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
    except pynvml.NVMLError:
        util = None
    name = pynvml.nvmlDeviceGetName(handle)
    uuid = pynvml.nvmlDeviceGetUUID(handle)
    return GpuInfo(
        uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
        name=name.decode() if isinstance(name, bytes) else name,
        total_bytes=int(mem.total),
        free_bytes=int(mem.free),
        utilization=util,
    )
