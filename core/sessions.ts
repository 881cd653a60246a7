// One client's session and the memory it lends the engine: regions (host
// files or CUDA allocations) and CUDA events, opened in the native engine
// under per-client and engine-wide quotas. A registration opens all of its
// regions or none; a closed session holds nothing native any more.
import * as fs from "fs";
import { EngineConfig } from "./config";
import { NativeEngine } from "./native";
import { ProtocolError } from "./protocol";
import { RegisterRequest, ReleaseRequest, unknownRegion } from "./requests";
import type { PendingCommit } from "./pending_commits";
import type { Task } from "./tasks";

/** Regions (mappings) of all clients together: below the kernel's per-process map count, with room for our own. */
const MAX_MAPPED_REGIONS = (() => {
  try {
    return Math.max(1024, Number(fs.readFileSync("/proc/sys/vm/max_map_count", "utf8").trim()) - 4096);
  } catch {
    return 60000;
  }
})();

export class Session {
  readonly regions = new Map<number, { nid: number; size: number }>(); // client region id -> native region
  readonly events = new Map<number, number>(); // client event id -> native event
  readonly tasks = new Map<number, Task>();
  readonly pending = new Map<string, PendingCommit>(); // "<ns>/<key hex>" -> dumped block
  readonly namespaces = new Set<string>(); // namespaces new to the engine this client brought in (maxNamespacesPerClient)
  nextRegion = 1;
  closed = false;
  constructor(
    readonly peer: string,
    readonly pid: number,
    readonly name: string,
    /** Whether the kernel vouched for `pid` (ipc, core/identity.ts); on tcp it is only what the hello said. */
    readonly verified = false,
  ) {}
}

type RegionQuotas = Pick<EngineConfig, "maxRegionsPerClient" | "maxRegionBytesPerClient">;

/** Opens the request's regions and events for `s`; their client ids, in request order. */
export function registerRegions(
  native: NativeEngine,
  quotas: RegionQuotas,
  s: Session,
  req: RegisterRequest,
): { regions: number[]; events?: number[] } {
  const specs = req.regions;
  // Quotas, before anything is opened: each region is a mapping in the engine (the kernel allows a process
  // some 65,000) and address space; one client must not use them up for the others.
  const held = Array.from(s.regions.values()).reduce((a, r) => a + r.size, 0);
  const asked = specs.reduce((a, r) => a + r.size, 0);
  if (s.regions.size + specs.length > quotas.maxRegionsPerClient) {
    throw new ProtocolError(
      "too_large",
      `this client would hold ${s.regions.size + specs.length} regions, more than maxRegionsPerClient ${quotas.maxRegionsPerClient}; release some first`,
    );
  }
  if (held + asked > quotas.maxRegionBytesPerClient) {
    throw new ProtocolError(
      "too_large",
      `this client would hold ${held + asked} bytes of regions, more than maxRegionBytesPerClient ${quotas.maxRegionBytesPerClient}; release some first`,
    );
  }
  const mapped = native.stats().regions;
  if (mapped + specs.length > MAX_MAPPED_REGIONS) {
    throw new ProtocolError(
      "busy",
      `the engine holds ${mapped} regions of all clients; ${specs.length} more would pass its limit of ${MAX_MAPPED_REGIONS}`,
    );
  }
  const opened: number[] = [];
  const openedEv: number[] = [];
  try {
    for (const [i, sp] of specs.entries()) {
      // /proc/<pid>/fd/<n> reaches into the process the session claims to be: only one the kernel vouched for.
      if (sp.medium === "host" && !s.verified && sp.source.startsWith("/proc/")) {
        throw new ProtocolError(
          "bad_message",
          `regions[${i}]: ${sp.source}: on tcp the engine cannot verify a client's pid, so it opens no /proc/<pid>/fd path; ` +
            "use a POSIX shared memory name or a /dev/shm path (or an ipc endpoint)",
        );
      }
      try {
        opened.push(
          sp.medium === "host"
            ? native.openHostRegion(sp.source, sp.size, s.pid)
            : native.openCudaRegion(sp.device, sp.handle, sp.offset, sp.size, sp.pciBusId),
        );
      } catch (e) {
        throw new ProtocolError(sp.medium === "cuda" ? "unsupported" : "bad_message", `regions[${i}]: ${(e as Error).message}`);
      }
    }
    for (const [i, ev] of req.events.entries()) {
      try {
        openedEv.push(native.openCudaEvent(ev.device, ev.handle, ev.pciBusId));
      } catch (e) {
        throw new ProtocolError("unsupported", `events[${i}]: ${(e as Error).message}`);
      }
    }
  } catch (e) {
    for (const id of opened) native.closeRegion(id);
    for (const id of openedEv) native.closeEvent(id);
    throw e;
  }
  const ids = opened.map((nid, i) => {
    const id = s.nextRegion++;
    s.regions.set(id, { nid, size: specs[i].size });
    return id;
  });
  if (req.events.length === 0) return { regions: ids };
  const evIds = openedEv.map((nid) => {
    const id = s.nextRegion++;
    s.events.set(id, nid);
    return id;
  });
  return { regions: ids, events: evIds };
}

/** Closes the listed regions of `s`; all of them must be its own, or none is closed. */
export function releaseRegions(native: NativeEngine, s: Session, req: ReleaseRequest): Record<string, never> {
  req.regions.forEach((id, i) => {
    if (!s.regions.has(id)) throw unknownRegion(i, id);
  });
  for (const id of req.regions) {
    native.closeRegion(s.regions.get(id)!.nid);
    s.regions.delete(id);
  }
  return {};
}

/** Closes every region and event of `s` (running transfers keep their mapping in the native engine). */
export function closeRegions(native: NativeEngine, s: Session): void {
  for (const r of s.regions.values()) native.closeRegion(r.nid);
  s.regions.clear();
  for (const nid of s.events.values()) native.closeEvent(nid);
  s.events.clear();
}
