// Store health: a circuit breaker in front of the storage directories. A
// directory that hangs (an NFS server gone) or fails makes every operation
// that touches it wait for its timeout; the scheduler asks about every new
// request, so each would pay it. Instead, the outcomes of the operations that
// reached the filesystem (lookups answered in time or not, blocks read or
// written or failed with an error of sick storage or past their deadline) go into a window
// of the last `healthWindowSize`; once `healthFailureThreshold` of them failed
// the breaker opens: lookups answer miss at once, dumps and loads are answered
// `dropped` at once, nothing waits on the directory. While open, a probe (a
// small file created, written and removed in every storage directory, bounded
// by healthCheckTimeoutS) runs every healthCheckIntervalS; the first that
// succeeds in time closes the breaker, and the store is used again.
// UCM's `store_health` keys configure the same (docs/configuration.md).
import { EngineConfig } from "./options";
import { Logger } from "./log";

/** The probe's file in every storage directory: this name, the engine's tag and a number (removed at once). */
export const HEALTH_PROBE_NAME = ".ucm-health-probe";

/** errno of a block cancelled because its client's deadline passed. */
export const ETIMEDOUT = 110;

/**
 * Block errors that say the storage itself is sick (the device, the server, the mount, the space): EIO, ENOSPC,
 * EROFS, ENOTCONN, ETIMEDOUT, EHOSTDOWN, EHOSTUNREACH, ESTALE, EREMOTEIO, EDQUOT. Others (a link or a file where a
 * directory should be, a file gone) are about one path, which the engine reports and refuses by itself.
 */
export const SICK_STORAGE_ERRNOS: ReadonlySet<number> = new Set([5, 28, 30, 107, 110, 112, 113, 116, 121, 122]);

export type HealthSettings = Pick<
  EngineConfig,
  "storeHealth" | "healthCheckIntervalS" | "healthCheckTimeoutS" | "healthWindowSize" | "healthFailureThreshold"
>;

/** True when every storage directory took a small write within `timeoutMs`. */
export type HealthProbe = (timeoutMs: number) => Promise<boolean>;

export interface HealthStats {
  /** 1 while the breaker is open (the store treated as absent). */
  open: number;
  /** Times it opened. */
  opens: number;
  /** Seconds it has been open in all (the current stretch included). */
  openSeconds: number;
  /** Operations answered without the directory while open. */
  shedLookups: number;
  shedDumpBlocks: number;
  shedLoadBlocks: number;
  /** Probes run while open, and those that failed. */
  probes: number;
  probesFailed: number;
}

export class StoreHealth {
  /** The last outcomes, oldest first: true = failed. */
  private readonly window: boolean[] = [];
  private failures = 0;
  /** Date.now() when the breaker opened; 0 while closed. */
  private openedAt = 0;
  private openMs = 0;
  private timer: NodeJS.Timeout | undefined;
  private probing = false;
  private lastFailure = "";
  readonly stats: HealthStats = {
    open: 0,
    opens: 0,
    openSeconds: 0,
    shedLookups: 0,
    shedDumpBlocks: 0,
    shedLoadBlocks: 0,
    probes: 0,
    probesFailed: 0,
  };

  constructor(
    private readonly settings: HealthSettings,
    private readonly probe: HealthProbe,
    private readonly log: Logger,
  ) {}

  /** True while the store is to be treated as absent. */
  get open(): boolean {
    return this.openedAt !== 0;
  }

  /**
   * Changes each time the breaker opens. An operation records its outcome with the generation it started in: one
   * that started before the breaker opened and ends after it closed (a read stuck in a hung filesystem until it came
   * back) says nothing of the directory as it is now.
   */
  get generation(): number {
    return this.stats.opens;
  }

  /**
   * One operation's outcome against the directory. `what` says what failed (for the log line when the breaker
   * opens). Outcomes while open are ignored: operations that started before it opened end late, and only a probe
   * decides when the directory is back. `generation`: the one the operation started in (see `generation`).
   */
  record(failed: boolean, what = "", generation = this.generation): void {
    if (!this.settings.storeHealth || this.open || generation !== this.generation) return;
    this.window.push(failed);
    if (failed) {
      this.failures++;
      this.lastFailure = what;
    }
    while (this.window.length > this.settings.healthWindowSize) {
      if (this.window.shift()) this.failures--;
    }
    if (this.failures >= this.settings.healthFailureThreshold) this.trip();
  }

  snapshot(): HealthStats {
    const now = Date.now();
    return {
      ...this.stats,
      open: this.open ? 1 : 0,
      openSeconds: (this.openMs + (this.open ? now - this.openedAt : 0)) / 1000,
    };
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  private trip(): void {
    this.openedAt = Date.now();
    this.stats.opens++;
    const s = this.settings;
    this.log.warn(
      `storage unhealthy: ${this.failures} of the last ${this.window.length} operations failed (last: ${this.lastFailure || "?"}); ` +
        `the store is off: lookups answer miss, dumps and loads are dropped at once, until a probe (every ${s.healthCheckIntervalS} s) ` +
        `finds every storage directory answering within ${s.healthCheckTimeoutS} s`,
    );
    this.timer = setInterval(() => void this.tryProbe(), s.healthCheckIntervalS * 1000);
    this.timer.unref();
  }

  private async tryProbe(): Promise<void> {
    // One probe at a time: a directory that hangs keeps its probe's lookup thread, and more would pile up.
    if (this.probing || !this.open) return;
    this.probing = true;
    this.stats.probes++;
    let ok: boolean;
    try {
      ok = await this.probe(this.settings.healthCheckTimeoutS * 1000);
    } catch {
      ok = false;
    } finally {
      this.probing = false;
    }
    if (!ok) {
      this.stats.probesFailed++;
      return;
    }
    if (!this.open) return;
    const openFor = Date.now() - this.openedAt;
    this.openMs += openFor;
    this.openedAt = 0;
    this.window.length = 0;
    this.failures = 0;
    this.stop();
    this.log.info(`storage healthy again after ${(openFor / 1000).toFixed(1)} s: the store is used again`);
  }
}
