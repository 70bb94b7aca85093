"""Accelerator descriptions for the roofline performance model, and the named presets.

An :class:`Accelerator` is a frozen description: dense (not 2:4-sparse) peak operations per
second per compute class (``fp4``, ``fp6``, ``fp8``, ``int8``, ``bf16``, ``fp16``, ``tf32``,
``fp32``), memory levels (capacity, bandwidth; the last level is where weights and the KV cache
live), interconnect tiers (bandwidth per device and direction, latency, how many devices a
tier spans) and the datasheets its figures come from. Presets (docs/cost-perf.md section 6,
each figure with its source): ``a100-sxm``, ``h100-sxm``, ``h200``, ``b200``, ``mi300x``, in
the registry :data:`ACCELERATORS` (qualified spelling ``accelerator:<name>``). Custom
accelerators come from YAML or JSON (:func:`load_accelerator`), in human units::

    name: my-npu
    peak_tflops: {fp8: 1000, bf16: 500}        # dense
    memory: [{name: HBM, capacity_gb: 96, bandwidth_gb_s: 4000}]
    network: [{name: link, bandwidth_gb_s: 400, latency_us: 3, devices: 8}]
    devices_per_node: 8
    sources: [{title: "my datasheet", url: "https://...", date: "2025-01"}]

This module imports nothing heavy (the ``precisim perf`` command stays light).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from precisim.formats.registry import Registry, UnknownNameError

__all__ = ["ACCELERATORS", "COMPUTE_CLASSES", "Accelerator", "AcceleratorError",
           "MemoryLevel", "NetworkTier", "Source", "UnknownAcceleratorError",
           "available_accelerators", "get_accelerator", "load_accelerator"]

#: compute classes, narrowest first within each family; a GEMM that an accelerator has no
#: class for runs in the next wider class it has (FALLBACK)
COMPUTE_CLASSES = ("fp4", "fp6", "fp8", "int4", "int8", "bf16", "fp16", "tf32", "fp32")

#: the classes tried, in order, when an accelerator lacks a class
FALLBACK: dict[str, tuple[str, ...]] = {
    "fp4": ("fp4", "fp6", "fp8", "bf16", "fp16", "tf32", "fp32"),
    "fp6": ("fp6", "fp8", "bf16", "fp16", "tf32", "fp32"),
    "fp8": ("fp8", "bf16", "fp16", "tf32", "fp32"),
    "int4": ("int4", "int8", "fp8", "bf16", "fp16", "fp32"),
    "int8": ("int8", "fp8", "bf16", "fp16", "fp32"),
    "bf16": ("bf16", "fp16", "tf32", "fp32"),
    "fp16": ("fp16", "bf16", "tf32", "fp32"),
    "tf32": ("tf32", "fp32"),
    "fp32": ("fp32",),
}

_T, _G, _US = 1e12, 1e9, 1e-6


class AcceleratorError(ValueError):
    """A malformed accelerator description (the message names the field and what is
    accepted)."""


class UnknownAcceleratorError(UnknownNameError, AcceleratorError):
    """An unknown accelerator name."""


def _positive(v: Any, what: str, zero_ok: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or (
            v < 0 if zero_ok else v <= 0):
        raise AcceleratorError(f"{what}={v!r} is not valid: accepted a "
                               f"{'non-negative' if zero_ok else 'positive'} finite number")
    return float(v)


@dataclass(frozen=True)
class Source:
    """Where figures come from: a document's title, URL and date (and what was taken)."""

    title: str
    url: str
    date: str
    note: str = ""

    def __post_init__(self) -> None:
        for f in ("title", "url", "date"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f).strip():
                raise AcceleratorError(f"source {f}={getattr(self, f)!r} is not valid: accepted "
                                       "a non-empty string")

    def cite(self) -> str:
        return f"{self.title} ({self.date}), {self.url}" + (f": {self.note}" if self.note else "")


@dataclass(frozen=True)
class MemoryLevel:
    """One memory level: capacity (bytes) and bandwidth (bytes/s)."""

    name: str
    capacity: float
    bandwidth: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "capacity", _positive(self.capacity, f"memory {self.name!r} "
                                                       "capacity"))
        object.__setattr__(self, "bandwidth", _positive(self.bandwidth, f"memory {self.name!r} "
                                                        "bandwidth"))


@dataclass(frozen=True)
class NetworkTier:
    """One interconnect tier: bandwidth per device and direction (bytes/s), latency per
    message (s) and the number of devices it connects (None: any number, e.g. the scale-out
    network)."""

    name: str
    bandwidth: float
    latency: float
    devices: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bandwidth", _positive(self.bandwidth, f"network {self.name!r} "
                                                        "bandwidth"))
        object.__setattr__(self, "latency", _positive(self.latency, f"network {self.name!r} "
                                                      "latency", zero_ok=True))
        if self.devices is not None and (isinstance(self.devices, bool) or not isinstance(
                self.devices, int) or self.devices < 1):
            raise AcceleratorError(f"network {self.name!r} devices={self.devices!r} is not "
                                   "valid: accepted a positive integer or None")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator (see the module docstring). ``peak`` holds ``(class, ops/s)`` pairs,
    dense; :meth:`peak_ops` looks a class up."""

    name: str
    peak: tuple[tuple[str, float], ...]
    memory: tuple[MemoryLevel, ...]
    network: tuple[NetworkTier, ...] = ()
    devices_per_node: int = 1
    sources: tuple[Source, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise AcceleratorError(f"accelerator name={self.name!r} is not valid: accepted a "
                                   "non-empty string")
        peak = tuple(self.peak.items()) if isinstance(self.peak, Mapping) else tuple(self.peak)
        if not peak:
            raise AcceleratorError(f"accelerator {self.name!r}: no peak ops/s; give at least "
                                   f"one of {', '.join(COMPUTE_CLASSES)}")
        seen = set()
        out = []
        for cls, v in peak:
            if cls not in COMPUTE_CLASSES:
                raise AcceleratorError(f"accelerator {self.name!r}: unknown compute class "
                                       f"{cls!r}; accepted: {', '.join(COMPUTE_CLASSES)}")
            if cls in seen:
                raise AcceleratorError(f"accelerator {self.name!r}: compute class {cls!r} "
                                       "given twice")
            seen.add(cls)
            out.append((cls, _positive(v, f"accelerator {self.name!r} peak {cls}")))
        object.__setattr__(self, "peak", tuple(out))
        if not self.memory:
            raise AcceleratorError(f"accelerator {self.name!r}: no memory level")
        for attr, cls in (("memory", MemoryLevel), ("network", NetworkTier),
                          ("sources", Source)):
            items = tuple(getattr(self, attr))
            if not all(isinstance(x, cls) for x in items):
                raise AcceleratorError(f"accelerator {self.name!r}: {attr} must hold "
                                       f"{cls.__name__} objects")
            object.__setattr__(self, attr, items)
        if isinstance(self.devices_per_node, bool) or not isinstance(
                self.devices_per_node, int) or self.devices_per_node < 1:
            raise AcceleratorError(f"accelerator {self.name!r}: devices_per_node="
                                   f"{self.devices_per_node!r} is not valid: accepted a "
                                   "positive integer")

    # -- derived ---------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[str, ...]:
        """The compute classes it has a peak for."""
        return tuple(c for c, _ in self.peak)

    def peak_ops(self, cls: str) -> float:
        """Dense peak ops/s of compute class ``cls`` (an error names the classes it has)."""
        for c, v in self.peak:
            if c == cls:
                return v
        raise AcceleratorError(f"accelerator {self.name!r} has no {cls!r} peak; it has "
                               f"{', '.join(self.classes)}")

    def resolve_class(self, cls: str) -> str:
        """The class a GEMM of class ``cls`` runs in here: ``cls``, or the next wider class
        it has (:data:`FALLBACK`)."""
        if cls not in FALLBACK:
            raise AcceleratorError(f"unknown compute class {cls!r}; accepted: "
                                   f"{', '.join(COMPUTE_CLASSES)}")
        for c in FALLBACK[cls]:
            if c in self.classes:
                return c
        raise AcceleratorError(f"accelerator {self.name!r} cannot run a {cls!r} GEMM: it has "
                               f"{', '.join(self.classes)}")

    @property
    def main_memory(self) -> MemoryLevel:
        """The last (largest) level: where weights and the KV cache live."""
        return self.memory[-1]

    @property
    def capacity(self) -> float:
        return self.main_memory.capacity

    @property
    def bandwidth(self) -> float:
        return self.main_memory.bandwidth

    def tier(self, devices: int) -> NetworkTier:
        """The fastest tier that connects ``devices`` devices (a group within a node uses the
        node's tier)."""
        if not self.network:
            raise AcceleratorError(f"accelerator {self.name!r} has no network tier: it cannot "
                                   f"connect {devices} devices")
        for t in self.network:
            if t.devices is None or devices <= t.devices:
                return t
        raise AcceleratorError(f"accelerator {self.name!r}: no network tier connects "
                               f"{devices} devices (tiers: " + ", ".join(
                                   f"{t.name} up to {t.devices}" for t in self.network) + ")")

    def ridge(self, cls: str) -> float:
        """Arithmetic intensity (ops per byte of main memory) where compute and memory time
        are equal."""
        return self.peak_ops(cls) / self.bandwidth

    def summary(self) -> str:
        peaks = ", ".join(f"{c} {v / _T:g}" for c, v in self.peak)
        mem = self.main_memory
        return (f"{self.name}: dense TFLOPS {peaks}; {mem.name} {mem.capacity / _G:g} GB at "
                f"{mem.bandwidth / _G:g} GB/s")

    # -- YAML / JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Human units (TFLOPS, GB, GB/s, us), as :func:`load_accelerator` reads them."""
        return {
            "name": self.name, "description": self.description,
            "peak_tflops": {c: v / _T for c, v in self.peak},
            "memory": [{"name": m.name, "capacity_gb": m.capacity / _G,
                        "bandwidth_gb_s": m.bandwidth / _G} for m in self.memory],
            "network": [{"name": t.name, "bandwidth_gb_s": t.bandwidth / _G,
                         "latency_us": t.latency / _US, "devices": t.devices}
                        for t in self.network],
            "devices_per_node": self.devices_per_node,
            "sources": [dataclasses.asdict(s) for s in self.sources],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "accelerator") -> Accelerator:
        if not isinstance(d, Mapping):
            raise AcceleratorError(f"{where}: expected a mapping, got {type(d).__name__}")
        keys = ("name", "description", "peak_tflops", "memory", "network", "devices_per_node",
                "sources")
        _check(d, keys, where)
        for k in ("name", "peak_tflops", "memory"):
            if k not in d:
                raise AcceleratorError(f"{where}: missing {k!r} (required: name, peak_tflops, "
                                       "memory)")
        name = str(d["name"])
        where = f"{where} {name!r}"
        peak = d["peak_tflops"]
        if not isinstance(peak, Mapping):
            raise AcceleratorError(f"{where}: peak_tflops must map compute classes to dense "
                                   f"TFLOPS, got {type(peak).__name__}")
        try:
            mem = tuple(MemoryLevel(str(m.get("name", f"level{i}")),
                                    _positive(m.get("capacity_gb"), f"{where} memory[{i}]."
                                              "capacity_gb") * _G,
                                    _positive(m.get("bandwidth_gb_s"), f"{where} memory[{i}]."
                                              "bandwidth_gb_s") * _G)
                        for i, m in enumerate(_list(d["memory"], f"{where} memory",
                                                    ("name", "capacity_gb", "bandwidth_gb_s"))))
            net = tuple(NetworkTier(str(t.get("name", f"tier{i}")),
                                    _positive(t.get("bandwidth_gb_s"), f"{where} network[{i}]."
                                              "bandwidth_gb_s") * _G,
                                    _positive(t.get("latency_us", 0), f"{where} network[{i}]."
                                              "latency_us", zero_ok=True) * _US,
                                    t.get("devices"))
                        for i, t in enumerate(_list(d.get("network") or [], f"{where} network",
                                                    ("name", "bandwidth_gb_s", "latency_us",
                                                     "devices"))))
            src = tuple(Source(**s) for s in _list(d.get("sources") or [], f"{where} sources",
                                                   ("title", "url", "date", "note")))
            return cls(name, tuple((str(k), _positive(v, f"{where} peak_tflops.{k}") * _T)
                                   for k, v in peak.items()), mem, net,
                       d.get("devices_per_node", 1), src, str(d.get("description", "")))
        except TypeError as e:
            raise AcceleratorError(f"{where}: {e}") from None


def _check(d: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    bad = [k for k in d if k not in keys]
    if bad:
        raise AcceleratorError(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; "
                               f"accepted: {', '.join(keys)}")


def _list(v: Any, where: str, keys: tuple[str, ...]) -> list[Mapping[str, Any]]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, Mapping) for x in v):
        raise AcceleratorError(f"{where}: expected a list of mappings, got {v!r}")
    for i, x in enumerate(v):
        _check(x, keys, f"{where}[{i}]")
    return list(v)


def load_accelerator(path: str | Path) -> Accelerator:
    """A custom accelerator from a YAML or JSON file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise AcceleratorError(f"accelerator file {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        d = json.loads(text)
    else:
        import yaml

        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise AcceleratorError(f"{p}: malformed YAML: {e}") from None
    return Accelerator.from_dict(d, where=f"accelerator file {str(p)!r}")


# ---------------------------------------------------------------------------------------------
# presets (docs/cost-perf.md section 6: every figure, its source, and what is assumed)

#: scale-out per GPU: one 400 Gb/s NIC (DGX H100/H200/B200 datasheets: 8 x ConnectX-7 400 Gb/s)
_SCALE_OUT_400G = NetworkTier("infiniband-400g", 50 * _G, 5 * _US)
#: NVLink message latency is an assumption (no datasheet gives one): a few microseconds
_NVLINK_LATENCY = 3 * _US

_H100_DS = Source("NVIDIA H100 Tensor Core GPU Datasheet",
                  "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
                  "2023", "H100 SXM column; dense = the 'with sparsity' figures / 2 (footnote)")
_H200_DS = Source("NVIDIA H200 Tensor Core GPU product page and datasheet",
                  "https://www.nvidia.com/en-us/data-center/h200/", "2024",
                  "H200 SXM column; dense = the 'with sparsity' figures / 2 (footnote)")
_B200_DS = Source("NVIDIA DGX B200 datasheet / HGX B200 specifications",
                  "https://www.nvidia.com/en-us/data-center/hgx/", "2025",
                  "HGX B200 per-GPU figures; dense = the 'with sparsity' figures / 2; 180 GB and "
                  "8 TB/s per GPU (1,440 GB, 64 TB/s per 8-GPU system)")
_MI300X_DS = Source("AMD Instinct MI300X Accelerator data sheet",
                    "https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/"
                    "data-sheets/amd-instinct-mi300x-data-sheet.pdf", "2023",
                    "peak dense figures (the structured-sparsity figures are twice these); "
                    "Infinity Fabric: 7 links, 896 GB/s aggregate peak (both directions)")
_A100_DS = Source("NVIDIA A100 Tensor Core GPU Datasheet",
                  "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
                  "nvidia-a100-datasheet-nvidia-us-2188504-web.pdf", "2021",
                  "A100 80GB SXM column; dense = the 'with sparsity' figures / 2")
_DGX_H100 = Source("NVIDIA DGX H100 datasheet", "https://www.nvidia.com/en-us/data-center/"
                   "dgx-h100/", "2023", "8 x ConnectX-7 400 Gb/s per 8 GPUs (scale-out tier)")


def _presets() -> list[Accelerator]:
    t = _T
    return [
        Accelerator(
            "a100-sxm", (("int8", 624 * t), ("bf16", 312 * t), ("fp16", 312 * t),
                         ("tf32", 156 * t), ("fp32", 19.5 * t)),
            (MemoryLevel("HBM2e", 80 * _G, 2039 * _G),),
            (NetworkTier("nvlink3", 300 * _G, _NVLINK_LATENCY, 8), _SCALE_OUT_400G), 8,
            (_A100_DS,), "NVIDIA A100 80GB SXM (Ampere)"),
        Accelerator(
            "h100-sxm", (("fp8", 1979 * t), ("int8", 1979 * t), ("bf16", 989.5 * t),
                         ("fp16", 989.5 * t), ("tf32", 494.5 * t), ("fp32", 67 * t)),
            (MemoryLevel("HBM3", 80 * _G, 3350 * _G),),
            (NetworkTier("nvlink4", 450 * _G, _NVLINK_LATENCY, 8), _SCALE_OUT_400G), 8,
            (_H100_DS, _DGX_H100), "NVIDIA H100 SXM5 80GB (Hopper)"),
        Accelerator(
            "h200", (("fp8", 1979 * t), ("int8", 1979 * t), ("bf16", 989.5 * t),
                     ("fp16", 989.5 * t), ("tf32", 494.5 * t), ("fp32", 67 * t)),
            (MemoryLevel("HBM3e", 141 * _G, 4800 * _G),),
            (NetworkTier("nvlink4", 450 * _G, _NVLINK_LATENCY, 8), _SCALE_OUT_400G), 8,
            (_H200_DS, _DGX_H100), "NVIDIA H200 SXM 141GB (Hopper, HBM3e)"),
        Accelerator(
            "b200", (("fp4", 9000 * t), ("fp6", 4500 * t), ("fp8", 4500 * t),
                     ("int8", 4500 * t), ("bf16", 2250 * t), ("fp16", 2250 * t),
                     ("tf32", 1100 * t)),
            (MemoryLevel("HBM3e", 180 * _G, 8000 * _G),),
            (NetworkTier("nvlink5", 900 * _G, _NVLINK_LATENCY, 8), _SCALE_OUT_400G), 8,
            (_B200_DS,), "NVIDIA B200 (HGX B200, Blackwell)"),
        Accelerator(
            "mi300x", (("fp8", 2614.9 * t), ("int8", 2614.9 * t), ("bf16", 1307.4 * t),
                       ("fp16", 1307.4 * t), ("tf32", 653.7 * t), ("fp32", 163.4 * t)),
            (MemoryLevel("HBM3", 192 * _G, 5300 * _G),),
            (NetworkTier("infinity-fabric", 448 * _G, _NVLINK_LATENCY, 8), _SCALE_OUT_400G), 8,
            (_MI300X_DS,), "AMD Instinct MI300X (CDNA 3)"),
    ]


#: the named accelerators (docs/naming.md; qualified spelling ``accelerator:<name>``)
ACCELERATORS: Registry[Accelerator] = Registry(
    "accelerator", error=UnknownAcceleratorError, hint="or give a .yaml/.json accelerator file")
for _a in _presets():
    ACCELERATORS.register(_a.name, _a, aliases=("h100",) if _a.name == "h100-sxm" else
                          ("a100",) if _a.name == "a100-sxm" else ())


def available_accelerators() -> list[str]:
    """The preset names :func:`get_accelerator` accepts."""
    return ACCELERATORS.names()


def get_accelerator(name: str | Path | Accelerator) -> Accelerator:
    """A preset by name (``h100-sxm``, ``h200``, ``b200``, ``mi300x``, ``a100-sxm``), a
    ``.yaml`` / ``.json`` file, or an :class:`Accelerator` (returned as it is)."""
    if isinstance(name, Accelerator):
        return name
    if isinstance(name, Path) or (isinstance(name, str) and Path(name).suffix.lower() in (
            ".yaml", ".yml", ".json")):
        return load_accelerator(name)
    if not isinstance(name, str):
        raise TypeError(f"accelerator must be a name, a file or an Accelerator, got "
                        f"{type(name).__name__}")
    return ACCELERATORS.get(name)
