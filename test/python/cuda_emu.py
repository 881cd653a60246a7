"""An emulated CUDA runtime on the Python side, for tests on machines without a GPU.

It stands in for torch's CUDA runtime (which we do not own) so that the
shim's own code, unchanged, takes its GPU path: tensors whose `.device` is
`cuda:i`, `untyped_storage()._share_cuda_()` in torch's exact format,
interprocess events, `torch.cuda.get_device_properties` with PCI fields. It
never stands in for our code, and never for a run on real hardware.

The engine side is the emulated build of the native addon
(native/build-emu/Release/ucm_native.node, selected with UCM_NATIVE_ADDON).
Both sides agree on this (see native/cuda_emu/cuda_runtime.h):

- The node's GPUs: env UCM_CUDA_EMU_DEVICES, comma-separated PCI bus ids
  ("0000:01:00.0,0000:41:00.0"). CUDA_VISIBLE_DEVICES (indices into that
  list) selects and orders what a process sees, as CUDA does; it is read
  when the runtime is created, as CUDA reads it at initialisation.
- A device allocation is a POSIX shared memory object "/ucmemu-<pid>-<n>".
  Its 64-byte memory handle is b"UCMEMU-M", the bus id NUL-padded to 16
  bytes, the object's name NUL-padded to 40. torch exports it as
  b"\\x02c" + handle (66 bytes, torch 2.13's shareIpcHandle format).
- An event is a 16-byte shared memory object holding two little-endian
  uint64: how many records were issued, how many have completed. Its
  handle is b"UCMEMU-E", bus id (16), name (40). `record()` queues work
  (recorded += 1); the emulated GPU finishes it when the test says so
  (`complete_events`, or at once in auto-complete mode): completed = recorded.

"Writing on the GPU" is writing the tensor: its bytes are the shared memory
the engine maps.
"""

from __future__ import annotations

import itertools
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch

DEVICES_ENV = "UCM_CUDA_EMU_DEVICES"
DEFAULT_DEVICES = "0000:01:00.0,0000:41:00.0"
MEM_MAGIC = b"UCMEMU-M"
EVENT_MAGIC = b"UCMEMU-E"
#: torch's exported handle: format version 2, then 'c' (cudaMalloc) or 'e' (expandable segment)
TORCH_HANDLE_VERSION = 2

_names = itertools.count()


def _field(text: str, size: int, what: str) -> bytes:
    raw = text.encode()
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} does not fit {size - 1} bytes")
    return raw + b"\0" * (size - len(raw))


def handle64(magic: bytes, bus_id: str, shm_name: str) -> bytes:
    h = magic + _field(bus_id, 16, "bus id") + _field(shm_name, 40, "shm name")
    assert len(h) == 64
    return h


def _visible(n_physical: int) -> list[int]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: indices, in order; the list
    ends at the first entry that is not a valid index."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return list(range(n_physical))
    out: list[int] = []
    for item in cvd.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) >= n_physical or int(item) in out:
            break
        out.append(int(item))
    return out


class _Shm:
    """One POSIX shared memory object, created by this process."""

    def __init__(self, nbytes: int, kind: str):
        self.name = f"/ucmemu-{os.getpid()}-{next(_names)}{kind}"
        self.path = "/dev/shm" + self.name
        self.nbytes = nbytes
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class EmuAllocation:
    """One emulated device allocation (what cudaMalloc returned), mapped here
    as a uint8 CPU tensor. `kind`: "cudaMalloc" (exportable), "expandable"
    (expandable_segments:True: torch exports type 'e', which CUDA IPC cannot
    open) or "cumem" (CuMemAllocator, vLLM's sleep mode: torch cannot
    export it at all)."""

    def __init__(self, rt: "EmuRuntime", nbytes: int, device: int, kind: str):
        if kind not in ("cudaMalloc", "expandable", "cumem"):
            raise ValueError(f"kind must be cudaMalloc, expandable or cumem, got {kind!r}")
        self.rt, self.device, self.kind = rt, device, kind
        self.bus_id = rt.bus_id(device)
        self.shm = _Shm(nbytes, "m")
        self.mem = torch.from_file(self.shm.path, shared=True, size=nbytes, dtype=torch.uint8)
        self.handle = handle64(MEM_MAGIC, self.bus_id, self.shm.name)

    def torch_handle(self) -> bytes:
        """What torch's `_share_cuda_()[1]` holds for this allocation."""
        if self.kind == "cudaMalloc":
            return bytes([TORCH_HANDLE_VERSION]) + b"c" + self.handle
        if self.kind == "expandable":
            # An expandable segment: a list of shareable handles (here one
            # placeholder of 76 bytes, 78 in all as on a real H100), never
            # a cudaIpcMemHandle_t.
            return bytes([TORCH_HANDLE_VERSION]) + b"e" + struct.pack("<QQ", self.mem.numel(), 1) + b"\xee" * 60
        raise RuntimeError(
            "CUDAPluggableAllocator does not yet support shareIpcHandle. "
            "If you need it, please file an issue describing your use case."
        )

    def storage(self, offset: int = 0, nbytes: int | None = None) -> "EmuStorage":
        nbytes = self.mem.numel() - offset if nbytes is None else nbytes
        if offset < 0 or offset + nbytes > self.mem.numel():
            raise ValueError(
                f"storage [{offset}, {offset + nbytes}) outside the allocation of {self.mem.numel()} bytes"
            )
        return EmuStorage(self, offset, nbytes)


class EmuStorage:
    """A storage in an emulated allocation (torch's caching allocator puts
    several storages in one cudaMalloc block: hence the offset)."""

    def __init__(self, alloc: EmuAllocation, offset: int, nbytes: int):
        self.alloc, self.offset, self._nbytes = alloc, offset, nbytes

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.alloc.device)

    def data_ptr(self) -> int:
        return self.alloc.mem.data_ptr() + self.offset

    def nbytes(self) -> int:
        return self._nbytes

    def size(self) -> int:
        return self._nbytes

    def host(self) -> torch.Tensor:
        """The storage's bytes as a plain CPU uint8 tensor (no copy)."""
        return self.alloc.mem[self.offset : self.offset + self._nbytes]

    def _share_cuda_(self) -> tuple[Any, ...]:
        # torch's order (StorageSharing.cpp share_cuda, unpacked the same way
        # in torch/multiprocessing/reductions.py): device, handle, storage
        # size in bytes, storage offset in bytes in the allocation, ref
        # counter handle, ref counter offset, event handle, event sync required.
        handle = self.alloc.torch_handle()
        return (self.alloc.device, handle, self._nbytes, self.offset, b"/torch_emu_refcount", 0, b"\0" * 64, False)


class EmuTensor(torch.Tensor):
    """A CUDA tensor of the emulated runtime: a CPU tensor over the
    allocation's shared memory that says it lives on `cuda:i`. Views of it
    (indexing, view, permute, ...) are EmuTensors too; results in other
    memory (clone, arithmetic) are plain CPU tensors."""

    _emu: EmuStorage

    @staticmethod
    def __new__(cls, host: torch.Tensor, storage: EmuStorage) -> "EmuTensor":
        t = torch.Tensor._make_subclass(cls, host)
        t._emu = storage
        return t

    def __init__(self, host: torch.Tensor, storage: EmuStorage):
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._emu.device

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def untyped_storage(self) -> EmuStorage:  # type: ignore[override]
        return self._emu

    def host(self) -> torch.Tensor:
        """The same bytes as a plain CPU tensor (no copy): compare with this."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.view(self.shape)

    def __repr__(self) -> str:  # torch's repr would look at the device
        return f"EmuTensor(cuda:{self._emu.alloc.device}, shape={tuple(self.shape)}, dtype={self.dtype})"

    @classmethod
    def __torch_function__(cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        storage = next((a._emu for a in _flat(args, kwargs) if isinstance(a, EmuTensor)), None)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return _rewrap(out, storage)


def _flat(args: tuple, kwargs: dict | None):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


def _rewrap(out: Any, storage: EmuStorage | None) -> Any:
    if storage is None:
        return out
    if isinstance(out, torch.Tensor) and not isinstance(out, EmuTensor):
        base = storage.alloc.mem.data_ptr()
        # A view of the emulated device memory stays on the device.
        if out.untyped_storage().data_ptr() == base:
            return EmuTensor(out, storage)
        return out
    if isinstance(out, (list, tuple)) and any(isinstance(o, torch.Tensor) for o in out):
        return type(out)(_rewrap(o, storage) for o in out)
    return out


class EmuStream:
    def __init__(self, device: int):
        self.device = torch.device("cuda", device)
        self.device_index = device

    def __repr__(self) -> str:
        return f"EmuStream(cuda:{self.device_index})"


class EmuEvent:
    """torch.cuda.Event of the emulated runtime. As in CUDA, the event is
    created at its first record, on the recording stream's device."""

    def __init__(
        self, rt: "EmuRuntime", enable_timing: bool = False, blocking: bool = False, interprocess: bool = False
    ):
        self.rt, self.interprocess = rt, interprocess
        self.shm: _Shm | None = None
        self.counters: torch.Tensor | None = None  # int64 [recorded, completed], shared with the engine
        self.device: int | None = None

    def _create(self, device: int) -> None:
        self.shm = _Shm(16, "e")
        self.counters = torch.from_file(self.shm.path, shared=True, size=2, dtype=torch.int64)
        self.device = device
        self.rt._events.append(self)

    def record(self, stream: EmuStream | None = None) -> None:
        stream = stream or self.rt.current_stream()
        if self.counters is None:
            self._create(stream.device_index)
        elif stream.device_index != self.device:
            raise RuntimeError(
                f"Event device {self.device} does not match recording stream's device {stream.device_index}."
            )
        assert self.counters is not None
        self.counters[0] += 1  # queued: the work before it has not run yet
        if self.rt.auto_complete:
            self.complete()

    def complete(self) -> None:
        """The emulated GPU has run everything queued before the last record."""
        if self.counters is not None:
            self.counters[1] = int(self.counters[0])

    @property
    def recorded(self) -> int:
        return int(self.counters[0]) if self.counters is not None else 0

    @property
    def completed(self) -> int:
        return int(self.counters[1]) if self.counters is not None else 0

    def query(self) -> bool:
        return self.completed >= self.recorded

    def ipc_handle(self) -> bytes:
        if not self.interprocess:
            raise RuntimeError("Event was not created with interprocess=True")
        if self.shm is None:  # torch creates it on the current device
            self._create(self.rt.current)
        assert self.shm is not None and self.device is not None
        return handle64(EVENT_MAGIC, self.rt.bus_id(self.device), self.shm.name)


@dataclass
class EmuDeviceProperties:
    name: str
    pci_domain_id: int
    pci_bus_id: int
    pci_device_id: int
    total_memory: int = 80 * 1024**3
    major: int = 9
    minor: int = 0


class EmuRuntime:
    """The emulated node as this process sees it."""

    def __init__(self, devices: str | None = None, auto_complete: bool = False):
        spec = devices if devices is not None else os.environ.get(DEVICES_ENV, DEFAULT_DEVICES)
        self.physical = [d.strip().lower() for d in spec.split(",") if d.strip()]
        for d in self.physical:
            parts = d.replace(".", ":").split(":")
            if len(parts) != 4 or not all(all(c in "0123456789abcdef" for c in p) and p for p in parts):
                raise ValueError(f"{DEVICES_ENV}: {d!r} is not a PCI bus id like 0000:41:00.0")
        self.visible = _visible(len(self.physical))
        self.current = 0
        self.auto_complete = auto_complete
        self._allocs: list[EmuAllocation] = []
        self._events: list[EmuEvent] = []

    # ---- devices ----------------------------------------------------------------

    def device_count(self) -> int:
        return len(self.visible)

    def _index(self, device: Any) -> int:
        if device is None:
            return self.current
        if isinstance(device, torch.device):
            return self.current if device.index is None else device.index
        if isinstance(device, str):
            return self._index(torch.device(device))
        i = int(device)
        if not 0 <= i < len(self.visible):
            raise RuntimeError(f"CUDA error: invalid device ordinal {i} (this process sees {len(self.visible)})")
        return i

    def bus_id(self, device: Any = None) -> str:
        return self.physical[self.visible[self._index(device)]]

    def properties(self, device: Any = None) -> EmuDeviceProperties:
        domain, bus, dev_fn = self.bus_id(device).split(":")
        dev = dev_fn.split(".")[0]
        return EmuDeviceProperties(f"Emulated GPU {self.bus_id(device)}", int(domain, 16), int(bus, 16), int(dev, 16))

    def set_device(self, device: Any) -> None:
        self.current = self._index(device)

    def current_stream(self, device: Any = None) -> EmuStream:
        return EmuStream(self._index(device))

    # ---- memory ------------------------------------------------------------------

    def alloc(self, nbytes: int, device: int = 0, kind: str = "cudaMalloc") -> EmuAllocation:
        a = EmuAllocation(self, nbytes, self._index(device), kind)
        self._allocs.append(a)
        return a

    def tensor(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype = torch.bfloat16,
        device: int = 0,
        kind: str = "cudaMalloc",
        alloc: EmuAllocation | None = None,
        offset: int = 0,
    ) -> EmuTensor:
        """A contiguous tensor on the emulated device, zeroed; in `alloc` at
        byte `offset` (a storage inside a larger allocation) or in an
        allocation of its own."""
        es = torch.empty((), dtype=dtype).element_size()
        nbytes = es
        for n in shape:
            nbytes *= n
        if alloc is None:
            alloc = self.alloc(nbytes, device, kind)
        storage = alloc.storage(offset, nbytes)
        host = storage.host().view(dtype).view(shape)
        host.zero_()
        return EmuTensor(host, storage)

    # ---- events --------------------------------------------------------------------

    def event(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> EmuEvent:
        return EmuEvent(self, enable_timing, blocking, interprocess)

    def complete_events(self) -> None:
        """The emulated GPUs finish all queued work."""
        for e in self._events:
            e.complete()

    def pending_events(self) -> int:
        return sum(1 for e in self._events if not e.query())

    def close(self) -> None:
        for a in self._allocs:
            a.shm.unlink()
        for e in self._events:
            if e.shm is not None:
                e.shm.unlink()
        self._allocs.clear()
        self._events.clear()


def torch_cuda_patches(rt: EmuRuntime) -> dict[str, Any]:
    """The torch.cuda attributes the shim uses, emulated."""

    def get_device_properties(device: Any = None) -> EmuDeviceProperties:
        return rt.properties(device)

    return {
        "is_available": lambda: rt.device_count() > 0,
        "device_count": rt.device_count,
        "current_device": lambda: rt.current,
        "set_device": rt.set_device,
        "get_device_properties": get_device_properties,
        "current_stream": rt.current_stream,
        "Event": rt.event,
    }


def install(rt: EmuRuntime, setattr_: Callable[[Any, str, Any], None]) -> None:
    """Puts the emulated runtime in torch.cuda with `setattr_` (pytest's
    monkeypatch.setattr undoes it after the test)."""
    for name, value in torch_cuda_patches(rt).items():
        setattr_(torch.cuda, name, value)


def install_for_process(rt: EmuRuntime) -> None:
    """For a helper process: the emulated runtime for the rest of its life."""
    install(rt, setattr)
