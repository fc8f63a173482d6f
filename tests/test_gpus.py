"""The GPU catalog, ``--gpu`` specs, and NVML detection (faked: no GPU is needed or used)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from airpack import gpus
from airpack.errors import GpuSpecError, NoGpuError
from airpack.gpus import CATALOG, budget_from_detected, detect_gpus, lookup, parse_gpu, resolve_gpus, try_detect

GiB = 1 << 30
MiB = 1 << 20


# -- names -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("h100", "H100-80GB"),
        ("H100-80GB", "H100-80GB"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("nvidia h100 pcie", "H100-PCIe"),
        ("NVIDIA H100 NVL", "H100-NVL"),
        ("h100-94gb", "H100-NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("a100_80g", "A100-80GB"),
        ("NVIDIA L40S", "L40S"),
        ("L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A10G", "A10G"),
        ("Tesla V100-SXM2-32GB", "V100-32GB"),
        ("Tesla V100-PCIE-16GB", "V100-16GB"),
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("rtx4090", "RTX-4090"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX-6000-Ada"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("NVIDIA GeForce RTX 5090", "RTX-5090"),
        ("AMD Instinct MI300X", "MI300X"),
        ("Tesla T4", "T4"),
    ],
)
def test_lenient_names(name: str, key: str) -> None:
    assert lookup(name).key == key


@pytest.mark.parametrize("name", ["a100", "V100", "nvidia a100"])
def test_names_that_could_mean_different_sizes_are_refused_with_the_choices(name: str) -> None:
    with pytest.raises(GpuSpecError, match="ambiguous") as e:
        lookup(name)
    assert "40GB" in e.value.message or "16GB" in e.value.message


@pytest.mark.parametrize("name", ["rtx 9999", "h100-40gb", "l4000", "tpu-v5", "a1000"])
def test_unknown_names(name: str) -> None:
    with pytest.raises(GpuSpecError):
        lookup(name)


def test_catalog_is_sane() -> None:
    keys = [g.key for g in CATALOG]
    assert len(keys) == len(set(keys))
    for g in CATALOG:
        # what CUDA sees is a little under the marketed size (GB or GiB), never above it
        assert 0.85 * g.memory_gb * 10**9 < g.memory_bytes <= g.memory_gb * GiB, g.key
        assert lookup(g.key) == g
    assert lookup("h100").memory_bytes == 85_017_493_504  # measured on the calibration H100


# -- specs -------------------------------------------------------------------------------------------------


def test_name_and_count() -> None:
    b = parse_gpu("H100-80GB:2")
    assert (b.name, b.count, b.memory_bytes, b.free_bytes, b.source) == ("H100-80GB", 2, 85_017_493_504, None, "catalog")


@pytest.mark.parametrize(("spec", "count", "size"), [("24GiB", 1, 24 * GiB), ("64MiB:2", 2, 64 * MiB), ("80GB:8", 8, 80 * 10**9),
                                                     ("1.5GiB", 1, 3 * GiB // 2), ("40960 MiB", 1, 40 * GiB)])
def test_sizes(spec: str, count: int, size: int) -> None:
    b = parse_gpu(spec)
    assert (b.count, b.memory_bytes, b.source) == (count, size, "size")


@pytest.mark.parametrize("spec", ["h100:0", "h100:-1", "h100:two", "h100:2000", "", ":2", "12KiB", "x" * 300])
def test_bad_specs(spec: str) -> None:
    with pytest.raises(GpuSpecError):
        parse_gpu(spec)


# -- NVML --------------------------------------------------------------------------------------------------


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_nvml(devices: list[dict[str, Any]] | None = None, *, init_error: int | None = None, v2: bool = True) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    m.NVML_ERROR_LIBRARY_NOT_FOUND = 12  # type: ignore[attr-defined]
    m.NVML_ERROR_DRIVER_NOT_LOADED = 9  # type: ignore[attr-defined]
    m.NVML_ERROR_NO_PERMISSION = 4  # type: ignore[attr-defined]
    m.nvmlMemory_v2 = object()  # type: ignore[attr-defined]
    calls: list[str] = []
    m.calls = calls  # type: ignore[attr-defined]
    devs = devices or []

    def init() -> None:
        calls.append("init")
        if init_error is not None:
            raise FakeNVMLError(init_error)

    def memory(h: int, version: object = None) -> types.SimpleNamespace:
        d = devs[h]
        if version is not None:
            if not v2:
                raise FakeNVMLError(13)
            return types.SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"] - d["reserved"], reserved=d["reserved"])
        return types.SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(devs)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = lambda h: devs[h]["name"].encode()  # type: ignore[attr-defined]
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h:04d}-aaaa"  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    return m


H100 = {"name": "NVIDIA H100 80GB HBM3", "total": 81559 * MiB, "reserved": 480 * MiB, "free": 70 * GiB}


@pytest.fixture(autouse=True)
def _no_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_nvml_not_installed_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with pytest.raises(NoGpuError, match="pynvml"):
        detect_gpus()
    assert try_detect() is None


@pytest.mark.parametrize(("code", "words"), [(12, "no NVIDIA driver"), (9, "driver is not loaded"), (4, "permission"), (999, "NVML error 999")])
def test_nvml_init_failure_is_named(monkeypatch: pytest.MonkeyPatch, code: int, words: str) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(init_error=code))
    with pytest.raises(NoGpuError, match=words):
        detect_gpus()
    assert try_detect() is None


def test_nvml_with_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_nvml([])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(NoGpuError, match="no device"):
        detect_gpus()
    assert fake.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_nvml_reports_free_memory_and_cuda_usable_total(monkeypatch: pytest.MonkeyPatch) -> None:
    busy = dict(H100, free=10 * GiB)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100, busy]))
    found = detect_gpus()
    assert [g.name for g in found] == ["NVIDIA H100 80GB HBM3"] * 2
    assert found[0].total_bytes == (81559 - 480) * MiB  # NVML's total less the driver's reserve
    b = budget_from_detected(found)
    assert (b.count, b.memory_bytes, b.free_bytes, b.source) == (2, (81559 - 480) * MiB, 10 * GiB, "nvml")
    assert resolve_gpus(None) == b
    assert resolve_gpus("auto:1").count == 1


def test_nvml_v1_memory_info_on_old_drivers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100], v2=False))
    (g,) = detect_gpus()
    assert g.total_bytes == 81559 * MiB


def test_cuda_visible_devices_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    l4 = {"name": "NVIDIA L4", "total": 23034 * MiB, "reserved": 0, "free": 20 * GiB}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100, l4]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    (g,) = detect_gpus()
    assert g.name == "NVIDIA L4"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NoGpuError, match="CUDA_VISIBLE_DEVICES"):
        detect_gpus()


def test_mixed_gpus_fit_the_smallest(monkeypatch: pytest.MonkeyPatch) -> None:
    l4 = {"name": "NVIDIA L4", "total": 23034 * MiB, "reserved": 0, "free": 20 * GiB}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([H100, l4]))
    b = budget_from_detected(detect_gpus())
    assert b.name.startswith("mixed") and b.memory_bytes == 23034 * MiB and b.free_bytes == 20 * GiB


def test_a_driver_failing_mid_query_is_a_clean_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_nvml([H100])

    def boom() -> int:
        raise FakeNVMLError(15)

    fake.nvmlDeviceGetCount = boom  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with pytest.raises(NoGpuError, match="cannot query"):
        detect_gpus()
    assert fake.calls == ["init", "shutdown"]  # type: ignore[attr-defined]


def test_gpus_module_imports_nvml_lazily() -> None:
    assert "pynvml" not in vars(gpus)
