"""Which GPUs a model must fit on: a catalog of common GPUs, ``NAME:COUNT`` specs, NVML detection.

The catalog holds the memory CUDA reports as the device total
(``cudaMemGetInfo`` / ``torch.cuda.mem_get_info``): a few hundred MiB below
nvidia-smi's figure, because the driver keeps some for itself. Names are matched
leniently (``h100``, ``H100-80GB``, ``NVIDIA H100 80GB HBM3``); a name that could
mean GPUs of different sizes (``A100``: 40 or 80 GB) is refused with the choices
rather than guessed. Sizes work too (``24GiB``, ``64MiB:2``) for MIG slices,
unlisted GPUs and tests.

Detection goes through NVML (nvidia-ml-py, imported lazily) and reports free
memory as well as total, so other tenants of the GPU count. No NVML library,
no driver or no device is a ``NoGpuError`` with one clear line, never a
traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import units
from .errors import GpuSpecError, NoGpuError, UsageError
from .vram import GpuBudget

MiB = 1 << 20
GiB = 1 << 30
MAX_COUNT = 1024


@dataclass(frozen=True)
class CatalogGpu:
    """One catalog entry. ``family`` tokens must all appear in a name; ``needs`` too (e.g. ``nvl``)."""

    key: str
    name: str
    memory_bytes: int
    memory_gb: int  # the marketed size, matched against "80GB" in a name
    family: frozenset[str]
    forms: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()
    source: str = "driver figure"
    bandwidth_gbps: int = 0  # memory bandwidth, GB/s (10^9 bytes per second), from the vendor's datasheet
    bandwidth_source: str = ""


def _g(key: str, name: str, mib: int | None, gb: int, family: str, *, forms: str = "", needs: str = "",
       exact: int | None = None, source: str = "driver figure", bw: int = 0, bw_source: str = "") -> CatalogGpu:
    return CatalogGpu(key=key, name=name, memory_bytes=exact if exact is not None else (mib or 0) * MiB, memory_gb=gb,
                      family=frozenset(family.split()), forms=frozenset(forms.split()), needs=frozenset(needs.split()),
                      source=source, bandwidth_gbps=bw, bandwidth_source=bw_source)


# Memory is what CUDA reports as total (torch.cuda.mem_get_info()[1]); see docs/fit.md.
CATALOG: tuple[CatalogGpu, ...] = (
    _g("H100-80GB", "NVIDIA H100 80GB HBM3 (SXM)", None, 80, "h100", forms="sxm", exact=85_017_493_504,
       source="measured (calibration file)", bw=3350,
       bw_source="NVIDIA H100 datasheet (SXM5: 3.35 TB/s)"),
    _g("H100-PCIe", "NVIDIA H100 PCIe 80GB", None, 80, "h100", forms="pcie", exact=85_017_493_504, bw=2000,
       bw_source="NVIDIA H100 datasheet (PCIe: 2 TB/s)"),
    _g("H100-NVL", "NVIDIA H100 NVL 94GB", 95_350, 94, "h100", forms="nvl", needs="nvl", bw=3900,
       bw_source="NVIDIA H100 datasheet (NVL: 3.9 TB/s)"),
    _g("H200", "NVIDIA H200 141GB HBM3e", 143_166, 141, "h200", forms="sxm nvl", bw=4800,
       bw_source="NVIDIA H200 datasheet (4.8 TB/s)"),
    _g("B200", "NVIDIA B200 180GB HBM3e", 182_630, 180, "b200", forms="sxm", bw=8000,
       bw_source="NVIDIA HGX B200 datasheet (8 TB/s per GPU)"),
    _g("A100-80GB", "NVIDIA A100 80GB", 81_050, 80, "a100", forms="sxm pcie", bw=2039,
       bw_source="NVIDIA A100 datasheet (80GB SXM: 2,039 GB/s; PCIe 1,935)"),
    _g("A100-40GB", "NVIDIA A100 40GB", 40_540, 40, "a100", forms="sxm pcie", bw=1555,
       bw_source="NVIDIA A100 datasheet (40GB: 1,555 GB/s)"),
    _g("L40S", "NVIDIA L40S 48GB", 45_600, 48, "l40s", bw=864,
       bw_source="NVIDIA L40S datasheet (864 GB/s)"),
    _g("L40", "NVIDIA L40 48GB", 45_600, 48, "l40", bw=864,
       bw_source="NVIDIA L40 datasheet (864 GB/s)"),
    _g("A40", "NVIDIA A40 48GB", 45_600, 48, "a40", bw=696,
       bw_source="NVIDIA A40 datasheet (696 GB/s)"),
    _g("L4", "NVIDIA L4 24GB", 22_560, 24, "l4", bw=300,
       bw_source="NVIDIA L4 datasheet (300 GB/s)"),
    _g("A10", "NVIDIA A10 24GB", 22_560, 24, "a10", bw=600,
       bw_source="NVIDIA A10 datasheet (600 GB/s)"),
    _g("A10G", "NVIDIA A10G 24GB", 22_560, 24, "a10g", bw=600,
       bw_source="AWS G5 instance documentation (A10G: 600 GB/s)"),
    _g("T4", "NVIDIA T4 16GB", 15_100, 16, "t4", bw=320,
       bw_source="NVIDIA T4 datasheet (320+ GB/s)"),
    _g("V100-32GB", "NVIDIA V100 32GB", 32_510, 32, "v100", forms="sxm pcie", bw=900,
       bw_source="NVIDIA V100 datasheet (SXM2: 900 GB/s)"),
    _g("V100-16GB", "NVIDIA V100 16GB", 16_150, 16, "v100", forms="sxm pcie", bw=900,
       bw_source="NVIDIA V100 datasheet (SXM2: 900 GB/s)"),
    _g("RTX-6000-Ada", "NVIDIA RTX 6000 Ada Generation 48GB", 48_640, 48, "6000 ada", bw=960,
       bw_source="NVIDIA RTX 6000 Ada datasheet (960 GB/s)"),
    _g("RTX-A6000", "NVIDIA RTX A6000 48GB", 48_680, 48, "a6000", bw=768,
       bw_source="NVIDIA RTX A6000 datasheet (768 GB/s)"),
    _g("RTX-5090", "NVIDIA GeForce RTX 5090 32GB", 32_110, 32, "5090", bw=1792,
       bw_source="NVIDIA GeForce RTX 5090 specifications (1,792 GB/s)"),
    _g("RTX-4090", "NVIDIA GeForce RTX 4090 24GB", 24_210, 24, "4090", bw=1008,
       bw_source="NVIDIA GeForce RTX 4090 specifications (1,008 GB/s)"),
    _g("RTX-3090", "NVIDIA GeForce RTX 3090 24GB", 24_250, 24, "3090", bw=936,
       bw_source="NVIDIA GeForce RTX 3090 specifications (936 GB/s)"),
    _g("MI300X", "AMD Instinct MI300X 192GB", None, 192, "mi300x", exact=205_822_885_888, bw=5300,
       bw_source="AMD Instinct MI300X datasheet (5.3 TB/s)"),
    _g("MI325X", "AMD Instinct MI325X 256GB", None, 256, "mi325x", exact=274_877_906_944, bw=6000,
       bw_source="AMD Instinct MI325X datasheet (6 TB/s)"),
)

_NOISE = {"nvidia", "tesla", "geforce", "quadro", "amd", "instinct", "radeon", "generation", "gpu", "hbm", "hbm2",
          "hbm2e", "hbm3", "hbm3e", "gddr6", "gddr6x", "gddr7", "the"}
_FORMS = {"sxm": "sxm", "sxm2": "sxm", "sxm4": "sxm", "sxm5": "sxm", "sxm6": "sxm", "pcie": "pcie", "pci": "pcie", "nvl": "nvl"}
_SIZE_TOKEN = re.compile(r"^(\d+)(?:gb|g|gib)$")


def _tokens(name: str) -> tuple[set[str], int | None, set[str]]:
    """(family tokens, memory size in GB if named, form factors) of a GPU name."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    out: set[str] = set()
    size: int | None = None
    forms: set[str] = set()
    for w in words:
        if w in _NOISE:
            continue
        m = _SIZE_TOKEN.match(w)
        if m:
            size = int(m.group(1))
            continue
        if w in _FORMS:
            forms.add(_FORMS[w])
            out.add(w)
            continue
        m2 = re.match(r"^(rtx|gtx)(\d+.*)$", w)
        if m2:
            out.update(m2.groups())
            continue
        out.add(w)
    return out, size, forms


def lookup(name: str) -> CatalogGpu:
    """The catalog entry a GPU name means; ``GpuSpecError`` when none or several sizes could be meant."""
    text = name.strip()
    for g in CATALOG:
        if g.key.lower() == text.lower():
            return g
    tokens, size, forms = _tokens(text)
    cands = [g for g in CATALOG if g.family <= tokens and (g.needs <= tokens or size == g.memory_gb)]
    if cands:
        most = max(len(g.family) for g in cands)
        cands = [g for g in cands if len(g.family) == most]
    if size is not None:
        sized = [g for g in cands if g.memory_gb == size]
        if cands and not sized:
            have = ", ".join(sorted({f"{g.memory_gb}GB" for g in cands}))
            raise GpuSpecError(f"unknown GPU {name!r}: no {size}GB variant in the catalog (known: {have}); give a size like {size}GiB instead")
        cands = sized
    if forms:
        formed = [g for g in cands if g.forms & forms]
        cands = formed or cands
    if not cands:
        raise GpuSpecError(f"unknown GPU {name!r}; known: {', '.join(g.key for g in CATALOG)} (or a size like 24GiB)")
    if len({g.memory_bytes for g in cands}) > 1:
        raise GpuSpecError(f"GPU name {name!r} is ambiguous: {', '.join(g.key for g in cands)}; say which")
    return cands[0]


def size_or_none(text: str) -> int | None:
    """Bytes of ``24GiB``, ``80GB``, ``64MiB`` (units.parse_size with a unit required); None when ``text`` is not a size."""
    try:
        return units.parse_size(text, require_unit=True)
    except UsageError:
        return None


_COUNT = re.compile(r"[0-9]{1,5}")


def split_count(spec: str) -> tuple[str, int]:
    """``NAME:COUNT`` → (NAME, COUNT); no ``:COUNT`` means one GPU.

    Strict, because a misread count is a wrong fit verdict: one ``:`` at most (``H100:2:3`` is
    refused, not read as 3 GPUs of "H100:2"), and the count is ASCII digits only.
    """
    text = spec.strip()
    if text.count(":") > 1:
        raise GpuSpecError(f"GPU spec {spec!r} has more than one ':'; write NAME:COUNT, e.g. H100-80GB:2")
    if ":" in text:
        name, _, count_s = text.partition(":")
        if not _COUNT.fullmatch(count_s.strip()):
            raise GpuSpecError(f"GPU spec {spec!r}: the count after ':' must be a whole number")
        count = int(count_s)
        if not 1 <= count <= MAX_COUNT:
            raise GpuSpecError(f"GPU spec {spec!r}: count must be between 1 and {MAX_COUNT}")
        return name.strip(), count
    return text, 1


def parse_gpu(spec: str, *, count: int | None = None) -> GpuBudget:
    """A ``--gpu`` value (catalog name or size, optional ``:COUNT``) as a ``GpuBudget`` of empty GPUs."""
    if not isinstance(spec, str) or not spec.strip() or len(spec) > 200:
        raise GpuSpecError(f"invalid GPU spec {spec!r}")
    if count is not None and ":" in spec:
        # A spec target names the count in its own field: "H100:4" with count = 1 would silently mean 1 GPU.
        raise GpuSpecError(f"GPU {spec!r} carries a count; in a spec write gpu = \"{spec.partition(':')[0].strip()}\" "
                           f"and count = {spec.partition(':')[2].strip() or 'N'}")
    name, n = split_count(spec)
    if count is not None:
        n = count
    if not name:
        raise GpuSpecError(f"GPU spec {spec!r} names no GPU")
    size = size_or_none(name)
    if size is not None:
        if size < MiB:
            raise GpuSpecError(f"GPU size {name!r} is smaller than 1 MiB")
        return GpuBudget(name=f"{name.replace(' ', '')} GPU", count=n, memory_bytes=size, source="size")
    g = lookup(name)
    return GpuBudget(name=g.key, count=n, memory_bytes=g.memory_bytes, source="catalog")


# -- NVML detection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectedGpu:
    index: int
    name: str
    uuid: str
    total_bytes: int  # what CUDA can use: NVML's total less the driver's reserve (when NVML reports it)
    free_bytes: int
    used_bytes: int


def _as_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _nvml_reason(nvml: Any, e: BaseException) -> str:
    code = getattr(e, "value", None)
    names = {
        "NVML_ERROR_LIBRARY_NOT_FOUND": "the NVML library (libnvidia-ml.so) was not found: no NVIDIA driver is installed",
        "NVML_ERROR_DRIVER_NOT_LOADED": "the NVIDIA driver is not loaded",
        "NVML_ERROR_NO_PERMISSION": "no permission to query the NVIDIA driver",
        "NVML_ERROR_FUNCTION_NOT_FOUND": "the NVIDIA driver is too old for NVML",
    }
    for const, text in names.items():
        if code is not None and getattr(nvml, const, object()) == code:
            return text
    return str(e) or type(e).__name__


def _visible(gpus: list[DetectedGpu]) -> list[DetectedGpu]:
    """Honour CUDA_VISIBLE_DEVICES (indices or GPU UUIDs), as the runtime will."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return gpus
    out: list[DetectedGpu] = []
    for item in (x.strip() for x in env.split(",")):
        if not item:
            continue
        if item.lstrip("-").isdigit():
            i = int(item)
            if i < 0:
                break  # CUDA stops at the first invalid entry
            out.extend(g for g in gpus if g.index == i)
        elif item.startswith("GPU-"):
            out.extend(g for g in gpus if g.uuid.startswith(item))
        else:
            return gpus  # MIG or other forms: not filtered here
    return out


def detect_gpus() -> list[DetectedGpu]:
    """The host's GPUs through NVML; ``NoGpuError`` (one line) when there are none to see."""
    try:
        import pynvml as nvml  # the NVIDIA driver's library, loaded only when the host's GPUs are asked for
    except Exception as e:  # noqa: BLE001 - any import failure means "no NVML here"
        raise NoGpuError(f"no GPU detected: nvidia-ml-py (pynvml) cannot be imported ({type(e).__name__})") from None
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError or OSError from a broken driver
        raise NoGpuError(f"no GPU detected: {_nvml_reason(nvml, e)}") from None
    gpus: list[DetectedGpu] = []
    try:
        count = int(nvml.nvmlDeviceGetCount())
        for i in range(count):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = _as_str(nvml.nvmlDeviceGetName(h))
            try:
                uuid = _as_str(nvml.nvmlDeviceGetUUID(h))
            except Exception:  # noqa: BLE001 - the UUID only filters CUDA_VISIBLE_DEVICES
                uuid = ""
            reserved = 0
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(h, version=nvml.nvmlMemory_v2)
                reserved = int(getattr(mem, "reserved", 0) or 0)
            except Exception:  # noqa: BLE001 - older drivers: v1 has no reserved figure
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            total = int(mem.total) - reserved
            gpus.append(DetectedGpu(index=i, name=name, uuid=uuid, total_bytes=total, free_bytes=int(mem.free),
                                    used_bytes=int(mem.used)))
    except NoGpuError:
        raise
    except Exception as e:  # noqa: BLE001 - a driver that fails mid-query
        raise NoGpuError(f"cannot query the GPUs through NVML: {_nvml_reason(nvml, e)}") from None
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    gpus = _visible(gpus)
    if not gpus:
        where = " visible through CUDA_VISIBLE_DEVICES" if "CUDA_VISIBLE_DEVICES" in os.environ else ""
        raise NoGpuError(f"no GPU detected: NVML sees no device{where}")
    return gpus


def budget_from_detected(gpus: Sequence[DetectedGpu]) -> GpuBudget:
    """All detected GPUs as one tensor-parallel group, limited by the smallest and the fullest of them."""
    names = sorted({g.name for g in gpus})
    name = names[0] if len(names) == 1 else "mixed: " + ", ".join(names)
    return GpuBudget(name=name, count=len(gpus), memory_bytes=min(g.total_bytes for g in gpus),
                     free_bytes=min(g.free_bytes for g in gpus), source="nvml")


def resolve_gpus(spec: str | None) -> GpuBudget:
    """``--gpu`` when given (``auto`` or nothing: the host's GPUs through NVML)."""
    if spec is None or spec.strip().lower() in ("", "auto"):
        return budget_from_detected(detect_gpus())
    name, count = split_count(spec)
    if name.strip().lower() == "auto":
        b = budget_from_detected(detect_gpus())
        return GpuBudget(name=b.name, count=count, memory_bytes=b.memory_bytes, free_bytes=b.free_bytes, source="nvml")
    return parse_gpu(spec)


def try_detect() -> GpuBudget | None:
    """The host's GPUs, or None when none can be seen (install skips its fit check then)."""
    try:
        return budget_from_detected(detect_gpus())
    except NoGpuError:
        return None
