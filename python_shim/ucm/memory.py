"""Making tensors reachable by the engine, and describing where block bytes live.

The engine reads and writes only memory it can map itself: host shared
memory (`/proc/<pid>/fd/<fd>` of a shared memory file, or its name) and GPU
memory (a CUDA IPC handle). `RegionRegistry.export` makes a CPU tensor's
storage shared in place (torch swaps the storage's data pointer, so every
tensor viewing it keeps seeing the same data) or takes a CUDA storage's IPC
handle; the vLLM connector does this once for the KV cache. Each storage is
one engine region for as long as the storage lives, and no longer (see
`_Entry`). `StagingPool` holds the shared buffers through which NfsStore
copies CPU tensors that are not in shared memory. Dumps of GPU memory carry
an interprocess CUDA event recorded on the producing stream.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import weakref
from typing import Any

import torch

from .client import EngineClient, EngineError


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
        raise UnsupportedMemory(
            f"unknown CUDA handle format from torch {torch.__version__}: {len(raw)} bytes, "
            f"first byte {raw[0] if raw else None} (expected version {_TORCH_HANDLE_VERSION})"
        )
    kind = raw[1]
    if kind != ord("c"):
        what = _TORCH_HANDLE_TYPES.get(kind, f"type byte {kind!r}")
        raise UnsupportedMemory(
            f"the KV cache is {what}, which CUDA IPC (cudaIpcOpenMemHandle) cannot open; "
            "allocate it with plain cudaMalloc: unset PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
            "and do not run vLLM with --enable-sleep-mode"
        )
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


class _Entry:
    """One tensor storage as an engine region. It lives exactly as long as the
    storage: a weak reference says whether the storage is still the one
    described, and a finalizer on the storage queues the region for release
    when it dies. So a later storage at the same address (allocators reuse
    addresses all the time) can never be handed the region of a dead one,
    whose memory the engine would read or write instead of the new tensor's."""

    __slots__ = ("ref", "key", "start", "size", "spec", "epoch", "rid", "dead", "__weakref__")

    def __init__(self, storage: Any, key: tuple[str, int], spec: dict[str, Any]):
        self.ref = weakref.ref(storage)
        self.key = key
        self.start = key[1]
        self.size = int(spec["size"]) if spec["medium"] == "host" else int(storage.nbytes())
        self.spec = spec
        self.epoch = -1  # session in which rid is valid
        self.rid: int | None = None
        self.dead = False


def _storage_died(registry_ref: "weakref.ref[RegionRegistry]", entry: _Entry) -> None:
    # Runs wherever the last reference to the storage is dropped, possibly in
    # the middle of another engine request on this thread: only note it; the
    # registry releases the region at its next request (RegionRegistry.flush).
    entry.dead = True
    reg = registry_ref()
    if reg is not None:
        reg._dead.append(entry)


class RegionRegistry:
    """One engine region per tensor storage, registered on first use and
    released when the storage dies (see _Entry)."""

    def __init__(self, client: EngineClient | None):
        self.client = client
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._dead: collections.deque[_Entry] = collections.deque()
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
                    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
                ) from e
            index = int(info[0])
            return {
                "medium": "cuda",
                "device": index,
                "pci_bus_id": pci_bus_id(index),
                "handle": cuda_ipc_handle(bytes(info[1])),
                "offset": int(info[3]),
                "size": int(info[2]),
            }
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

    def _live(self, storage: Any, device: torch.device) -> _Entry | None:
        key = (str(device), storage.data_ptr())
        e = self._entries.get(key)
        if e is None:
            return None
        if e.ref() is storage and not e.dead:
            return e
        # Another storage now at this address: the entry described a dead one.
        if not e.dead:
            e.dead = True
            self._dead.append(e)
        del self._entries[key]
        return None

    def _entry(self, tensor: torch.Tensor) -> _Entry:
        storage = tensor.untyped_storage()
        dev = tensor.device
        e = self._live(storage, dev)
        if e is None:
            spec = self._export(storage, dev)
            key = (str(dev), storage.data_ptr())  # the CPU storage may have moved into shared memory
            stale = self._entries.get(key)
            if stale is not None and not stale.dead:
                stale.dead = True
                self._dead.append(stale)
            e = _Entry(storage, key, spec)
            self._entries[key] = e
            fin = weakref.finalize(storage, _storage_died, weakref.ref(self), e)
            fin.atexit = False
        return e

    def export(self, tensor: torch.Tensor) -> dict[str, Any]:
        """Makes the tensor's storage reachable by the engine (no engine call):
        moves CPU memory into shared memory in place, or takes the CUDA IPC
        handle. Raises UnsupportedMemory for GPU memory that cannot be shared,
        so a caller can find out once, up front, instead of at every transfer."""
        return self._entry(tensor).spec

    def flush(self) -> None:
        """Releases, with the engine, the regions of storages that died."""
        rids = []
        while self._dead:
            e = self._dead.popleft()
            if self._entries.get(e.key) is e:
                del self._entries[e.key]
            if e.rid is not None and self.client is not None and e.epoch == self.client.epoch:
                rids.append(e.rid)
            e.rid = None
        if rids:
            try:
                self.client.call("release", regions=rids)  # type: ignore[union-attr]
            except EngineError:
                pass  # a new session (or none): the engine has already let them go

    def locate_many(self, tensors: list[torch.Tensor], block_bytes: int = 0) -> list[tuple[int, int]]:
        """(region id, byte offset of the tensor's first element in the region)
        per tensor; storages not registered in this session are registered in
        one request. `block_bytes`, when known: the payload of one block the
        caller will dump, told with the registration so that the engine's
        Cache stage prepares its memory before the first block comes."""
        assert self.client is not None
        self.flush()
        entries = [self._entry(t) for t in tensors]
        epoch = self.client.ensure_session()  # a new session knows none of our regions
        need: list[_Entry] = []
        seen: set[int] = set()
        for e in entries:
            if (e.rid is None or e.epoch != epoch) and id(e) not in seen:
                seen.add(id(e))
                need.append(e)
        if need:
            extra = {"block_bytes": block_bytes} if block_bytes > 0 else {}
            rids = self.client.call("register", regions=[e.spec for e in need], **extra)["regions"]
            for e, rid in zip(need, rids):
                e.rid, e.epoch = int(rid), self.client.epoch
        return [(e.rid, t.data_ptr() - e.start) for e, t in zip(entries, tensors)]  # type: ignore[misc]

    def locate(self, tensor: torch.Tensor) -> tuple[int, int]:
        """(region id, byte offset of the tensor's first element in the region)."""
        return self.locate_many([tensor])[0]

    def find(self, addr: int, size: int) -> tuple[Any, int] | None:
        """(live storage, offset) of a registered storage holding [addr, addr+size), or None."""
        for e in self._entries.values():
            if not e.dead and e.start <= addr and addr + size <= e.start + e.size:
                s = e.ref()
                if s is not None:
                    return s, addr - e.start
        return None

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
        """The session changed: no region or event id is valid any more."""
        for e in self._entries.values():
            e.rid = None
        self._event_ids.clear()


class StagingPool:
    """Shared-memory buffers for CPU memory the engine cannot reach in place.

    The engine reads and writes only shared memory. A CPU tensor in private
    memory (what torch.empty, torch.rand, ... give) could be moved into shared
    memory in place, but that costs a file, a descriptor, a mapping in the
    engine and a copy for every tensor, which is ruinous for callers that
    allocate fresh buffers for every batch (UCM's own store scripts do). So
    NfsStore copies such tensors through these buffers instead: a dump copies
    in before the request is sent, a load copies out once the engine says a
    block arrived. A buffer is registered with the engine once (it is a
    shared storage like any other) and reused.

    The pool is bounded (`budget`, UCM_STAGING_BYTES, 512 MiB by default):
    fresh shared memory is slow the first time (the kernel zeroes each page
    at its first touch; on the 2-core development VM a store's first 2 GiB
    of private dumps ran at 13-62 % of the disk's speed, issue 29), so a call
    larger than the budget reuses chunks as the engine finishes with them
    (NfsStore drives that) instead of touching new memory for every byte.
    `prefault` makes the budget's chunks and touches their pages on a
    background thread, before the first call needs them. Idle buffers beyond
    the budget are dropped, which releases their regions."""

    GRANULE = 2 << 20
    #: Buffers are handed out in chunks of this size (an entry larger than it
    #: gets a chunk of its own): a large call is many pooled chunks, which
    #: stay registered and mapped (in this process and in the engine) from one
    #: call to the next, instead of one fresh buffer of the call's size.
    CHUNK = 64 << 20

    DEFAULT_BUDGET = 512 << 20

    def __init__(self, budget: int | None = None):
        self.budget = staging_budget() if budget is None else budget
        self.max_idle_bytes = self.budget
        self._idle: list[torch.Tensor] = []
        #: bytes of buffers handed out and not given back yet
        self.lent = 0
        self._lock = threading.Lock()
        self._prefaulting: threading.Thread | None = None
        self._cleared = False  # the store closed: nothing more is prefaulted

    @classmethod
    def plan(cls, sizes: list[int]) -> tuple[list[int], list[int], list[int]]:
        """Where entries of these byte sizes go, in order: (the byte size of
        each chunk, each entry's offset in its chunk, the index of its
        chunk); entries start on page boundaries, an entry larger than a
        chunk gets a chunk of its own."""
        chunk_sizes: list[int] = []
        offsets: list[int] = []
        where: list[int] = []
        free = 0
        for n in sizes:
            padded = -(-n // 4096) * 4096
            if not chunk_sizes or padded > free:
                chunk_sizes.append(max(cls.CHUNK, padded))
                free = chunk_sizes[-1]
            offsets.append(chunk_sizes[-1] - free)
            where.append(len(chunk_sizes) - 1)
            free -= padded
        return chunk_sizes, offsets, where

    def over_budget(self, nbytes: int) -> bool:
        """True when lending nbytes more would pass the budget while
        something is lent (one call larger than the budget still goes
        through once nothing else holds staging)."""
        with self._lock:
            return self.lent > 0 and self.lent + nbytes > self.budget

    def prefault(self) -> None:
        """Makes the budget's worth of chunks on a background thread and
        touches every page of them, so that the first calls copy into memory
        that is already there. Once per pool; UCM_STAGING_PREFAULT=0 turns
        it off."""
        if self._prefaulting is not None or os.environ.get("UCM_STAGING_PREFAULT", "1") == "0":
            return

        def run() -> None:
            for _ in range(self.budget // self.CHUNK):
                if _exiting.is_set() or self._cleared:
                    return
                with self._lock:
                    if self.lent + sum(b.numel() for b in self._idle) + self.CHUNK > self.budget:
                        return
                buf = self._new(self.CHUNK)
                populate(buf)
                with self._lock:
                    if self._cleared:
                        return
                    self._idle.append(buf)
                    self._idle.sort(key=lambda b: b.numel())

        self._prefaulting = threading.Thread(target=run, name="ucm-staging-prefault", daemon=True)
        _prefaulting.add(self._prefaulting)
        self._prefaulting.start()

    @staticmethod
    def _new(nbytes: int) -> torch.Tensor:
        try:
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=torch.uint8).set_(storage)
        except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - other torch versions
            return torch.empty(nbytes, dtype=torch.uint8).share_memory_()

    def take(self, nbytes: int) -> torch.Tensor:
        """A shared uint8 buffer of at least nbytes (at most about twice that)."""
        size = max(self.GRANULE, -(-nbytes // self.GRANULE) * self.GRANULE)
        with self._lock:
            best = None
            for i, b in enumerate(self._idle):
                if size <= b.numel() <= 2 * size and (best is None or b.numel() < self._idle[best].numel()):
                    best = i
            buf = self._idle.pop(best) if best is not None else None
            self.lent += buf.numel() if buf is not None else size
        return buf if buf is not None else self._new(size)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            self.lent -= buf.numel()
            self._idle.append(buf)
            self._idle.sort(key=lambda b: b.numel())
            while sum(b.numel() for b in self._idle) > self.max_idle_bytes:
                self._idle.pop()  # the largest; its region goes with it

    def clear(self) -> None:
        """Drops the idle buffers (the store closes); a prefault still running stops."""
        with self._lock:
            self._cleared = True
            self._idle.clear()


_exiting = threading.Event()
_prefaulting: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


@atexit.register
def _stop_prefaulting() -> None:
    # A thread still making shared memory while the interpreter finalizes
    # aborts the process (torch's allocator is torn down under it): each
    # stops after the chunk it is on.
    _exiting.set()
    for t in list(_prefaulting):
        t.join(timeout=10)


def staging_budget() -> int:
    """UCM_STAGING_BYTES ("256MiB", "1GiB" or bytes), else StagingPool.DEFAULT_BUDGET."""
    from .settings import parse_size

    v = os.environ.get("UCM_STAGING_BYTES", "").strip()
    if not v:
        return StagingPool.DEFAULT_BUDGET
    n = parse_size(v)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"UCM_STAGING_BYTES must be a size such as 256MiB or 1GiB, got {v!r}")
    return n


def populate(buf: torch.Tensor) -> None:
    """Every page of a fresh buffer made present now (madvise
    MADV_POPULATE_WRITE, Linux 5.14; else one write a page), so that nobody
    pays its first-touch faults in a copy later."""
    import ctypes

    n = buf.numel()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(buf.data_ptr(), n, 23) != 0:  # 23: MADV_POPULATE_WRITE
        buf[::4096].zero_()


def host_range_ok(addr: int, size: int, write: bool) -> bool:
    """True when [addr, addr+size) is mapped in this process, readable (and
    writable when `write`): checked before a raw address is read or written,
    so a device pointer or a stray number fails with an error instead of a
    crash."""
    if addr <= 0 or size <= 0:
        return False
    end, pos = addr + size, addr
    try:
        with open("/proc/self/maps") as f:
            maps = []
            for line in f:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                maps.append((lo, hi, parts[1]))
    except OSError:
        return False
    for lo, hi, perms in sorted(maps):
        if hi <= pos or lo > pos:
            continue
        if perms[0] != "r" or (write and perms[1] != "w"):
            return False
        pos = hi
        if pos >= end:
            return True
    return False


def raw_tensor(addr: int, size: int) -> torch.Tensor:
    """A uint8 CPU tensor over size bytes of this process's memory at addr (no copy)."""
    import ctypes

    return torch.frombuffer((ctypes.c_uint8 * size).from_address(addr), dtype=torch.uint8)
