"""Making tensors reachable by the engine, and describing where block bytes live.

A CPU tensor's storage is moved into shared memory once, in place (torch
swaps the storage's data pointer, so every tensor viewing it keeps seeing the
same data), and registered as a host region: `/proc/<pid>/fd/<fd>` of the
shared memory file. A CUDA tensor's storage is exported with its CUDA IPC
handle, and dumps of GPU memory carry an interprocess CUDA event recorded on
the producing stream. Nothing is copied through Python.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

from .client import EngineClient


# What torch's caching allocator puts in `_share_cuda_()[1]` (its
# shareIpcHandle): a format version byte (2), a type byte, then the payload.
# Type 'c' is memory from cudaMalloc, followed by the 64-byte
# cudaIpcMemHandle_t of the allocation's base; 'e' is an expandable segment
# (cuMemCreate), whose payload is a list of shareable handles that the legacy
# CUDA IPC call cannot open. Torch releases before the versioned format
# returned the bare 64 bytes.
CUDA_IPC_HANDLE_BYTES = 64
_TORCH_HANDLE_VERSION = 2
_TORCH_HANDLE_TYPES = {ord("c"): "cudaMalloc memory", ord("e"): "an expandable segment (expandable_segments:True)"}


class UnsupportedMemory(ValueError):
    """GPU memory that the engine cannot open through CUDA IPC."""


def cuda_ipc_handle(raw: bytes) -> bytes:
    """The 64-byte cudaIpcMemHandle_t inside torch's exported handle, or
    UnsupportedMemory naming what was found instead."""
    if len(raw) == CUDA_IPC_HANDLE_BYTES:
        return raw
    if len(raw) < 2 or raw[0] != _TORCH_HANDLE_VERSION:
        raise UnsupportedMemory(f"unknown CUDA handle format from torch {torch.__version__}: {len(raw)} bytes, "
                                f"first byte {raw[0] if raw else None} (expected version {_TORCH_HANDLE_VERSION})")
    kind = raw[1]
    if kind != ord("c"):
        what = _TORCH_HANDLE_TYPES.get(kind, f"type byte {kind!r}")
        raise UnsupportedMemory(f"the KV cache is {what}, which CUDA IPC (cudaIpcOpenMemHandle) cannot open; "
                                "allocate it with plain cudaMalloc: unset PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                                "and do not run vLLM with --enable-sleep-mode")
    if len(raw) != 2 + CUDA_IPC_HANDLE_BYTES:
        raise UnsupportedMemory(f"torch's cudaMalloc handle has {len(raw)} bytes, expected {2 + CUDA_IPC_HANDLE_BYTES}")
    return raw[2:]


def pci_bus_id(index: int) -> str:
    """The PCI address of this process's CUDA device `index`, as
    cudaDeviceGetByPCIBusId reads it ("0000:41:00.0"). Device numbers are
    per process (vLLM gives each worker its own CUDA_VISIBLE_DEVICES; the
    engine sees every GPU of the node), the bus id is the same everywhere, so
    the engine finds the GPU by it."""
    p = torch.cuda.get_device_properties(index)
    return "%04x:%02x:%02x.0" % (p.pci_domain_id, p.pci_bus_id, p.pci_device_id)


@dataclass
class _Region:
    epoch: int
    region_id: int
    size: int


class RegionRegistry:
    """One engine region per tensor storage, registered on first use."""

    def __init__(self, client: EngineClient):
        self.client = client
        self._regions: dict[tuple[str, int], _Region] = {}
        self._specs: dict[tuple[str, int], dict[str, Any]] = {}
        self._events: dict[int, Any] = {}  # device index -> torch.cuda.Event(interprocess=True)
        self._event_ids: dict[int, tuple[int, int]] = {}  # device index -> (session epoch, engine event id)

    @staticmethod
    def _export(storage: torch.UntypedStorage, device: torch.device) -> dict[str, Any]:
        if device.type == "cuda":
            try:
                # (device, handle, storage size, offset, ref counter handle, ...)
                info = storage._share_cuda_()
            except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, allocators may raise anything
                # vLLM's sleep mode allocates the KV cache with CuMemAllocator
                # (cuMemCreate), which torch cannot export at all.
                raise UnsupportedMemory(
                    f"torch cannot export the KV cache on {device} for another process ({type(e).__name__}: {e}); "
                    "allocate it with plain cudaMalloc: do not run vLLM with --enable-sleep-mode and unset "
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True") from e
            index = int(info[0])
            return {"medium": "cuda", "device": index, "pci_bus_id": pci_bus_id(index),
                    "handle": cuda_ipc_handle(bytes(info[1])), "offset": int(info[3]), "size": int(info[2])}
        if device.type != "cpu":
            raise ValueError(f"tensor on device {device} cannot be registered: only cpu and cuda are supported")
        try:
            fd, size = storage._share_fd_cpu_()
            source = f"/proc/{os.getpid()}/fd/{fd}"
        except RuntimeError:
            # Already shared through the file_system strategy: use its name.
            _, name, size = storage._share_filename_cpu_()
            source = name.decode() if isinstance(name, bytes) else name
        return {"medium": "host", "source": source, "size": int(size)}

    def export(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Makes the tensor's storage reachable by the engine (no engine call):
        moves CPU memory into shared memory, or takes the CUDA IPC handle.
        Raises UnsupportedMemory for GPU memory that cannot be shared, so a
        caller can find out once, up front, instead of at every transfer."""
        storage = tensor.untyped_storage()
        dev = tensor.device
        key = (str(dev), storage.data_ptr())
        spec = self._specs.get(key)
        if spec is None:
            spec = self._export(storage, dev)
            key = (str(dev), storage.data_ptr())  # the CPU storage may have moved
            self._specs[key] = spec
        return spec

    def locate(self, tensor: torch.Tensor) -> tuple[int, int]:
        """(region id, byte offset of the tensor's first element in the region)."""
        spec = self.export(tensor)
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        epoch = self.client.ensure_session()  # a new session knows none of our regions
        reg = self._regions.get(key)
        if reg is None or reg.epoch != epoch:
            rid = self.client.call("register", regions=[spec])["regions"][0]
            reg = _Region(self.client.epoch, rid, spec["size"])
            self._regions[key] = reg
        offset = tensor.data_ptr() - storage.data_ptr()
        return reg.region_id, offset

    def record_event(self, device: torch.device) -> int:
        """Records an interprocess CUDA event on `device`'s current stream and
        returns its engine id: a dump that names it makes the engine's copy
        wait until everything queued on that stream so far (the forward pass
        that wrote the blocks) has run. One event per device, registered once
        per engine session."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        ev = self._events.get(index)
        if ev is None:
            ev = torch.cuda.Event(enable_timing=False, interprocess=True)
            ev.record(torch.cuda.current_stream(index))  # creates it on this device
            self._events[index] = ev
        epoch = self.client.ensure_session()
        reg = self._event_ids.get(index)
        if reg is None or reg[0] != epoch:
            spec = {"device": index, "pci_bus_id": pci_bus_id(index), "handle": bytes(ev.ipc_handle())}
            eid = self.client.call("register", events=[spec])["events"][0]
            reg = (self.client.epoch, int(eid))
            self._event_ids[index] = reg
        ev.record(torch.cuda.current_stream(index))
        return reg[1]

    def forget(self) -> None:
        self._regions.clear()
        self._event_ids.clear()


class ShardList:
    """Columns of a dump/load request, sent as little-endian bin."""

    def __init__(self, per_block: int):
        self.per_block = per_block
        self.region: list[int] = []
        self.offset: list[int] = []
        self.length: list[int] = []

    def add(self, region: int, offset: int, length: int) -> None:
        self.region.append(region)
        self.offset.append(offset)
        self.length.append(length)

    def wire(self) -> dict[str, Any]:
        n = len(self.region)
        return {
            "count": self.per_block,
            "region": struct.pack(f"<{n}I", *self.region),
            "offset": struct.pack(f"<{n}Q", *self.offset),
            "length": struct.pack(f"<{n}Q", *self.length),
        }
