// Where a dump or load is tracked once submitted: task ids (engine-wide, the
// native engine cancels by them), each client's task table, results kept until
// read (bounded: MAX_FINISHED_TASKS unread, SEEN_RESULT_TTL_MS once seen), and
// the wait, check and cancel ops. A task's result is set exactly once, also
// when its bookkeeping throws, so a waiting client always gets an answer.
import { BLOCK_STATUS_NAMES, BlockStatus, NativeEngine, TransferResult } from "./native";
import { Logger } from "./log";
import { ProtocolError, WireStatus } from "./protocol";
import { TaskRequest, WaitRequest } from "./requests";
import { Session } from "./sessions";
import { Direction } from "./transfers";

/** Per-block result names on the wire are the native status names. */
const WIRE = BLOCK_STATUS_NAMES as Record<BlockStatus, WireStatus>;

/** Finished tasks a client may leave unread before the oldest are forgotten. */
const MAX_FINISHED_TASKS = 4096;
/** How long a result stays readable after the client has seen it done. */
const SEEN_RESULT_TTL_MS = 60_000;
/** How long cancel may wait for a block copy in progress to end. */
const CANCEL_TIMEOUT_MS = 5000;

export interface TaskResult {
  done: true;
  direction: Direction;
  status: WireStatus[];
  errno: number[];
  failed: number[];
  bytes: number;
  elapsed_s: number;
  /** The seed's line for this task, as the engine logged it, for the client to log where its user looks. */
  line: string;
}

/** What the store's bookkeeping makes of a transfer's result, per block of the request. */
export interface Finished {
  status: BlockStatus[];
  errno: number[];
  bytes: number;
  elapsed: number;
  line: string;
}

export interface Task {
  id: number;
  direction: Direction;
  /** Blocks of its native transfer (a dump's written ones: skipped and shed blocks are not in it). */
  nativeBlocks: number;
  done: Promise<unknown>;
  result?: TaskResult;
  seenAt?: number;
}

/** The reply about a task still running. */
export interface Running {
  done: false;
  /** Dumps: no block reads the client's memory any more. */
  released?: boolean;
}

/** Called once per finished task (metrics). */
export type TaskObserver = (direction: Direction, seconds: number, blocksOk: number, bytes: number) => void;

export class TaskTracker {
  private nextId = 1;
  private readonly inflight = new Set<Promise<unknown>>();

  constructor(
    private readonly native: NativeEngine,
    private readonly log: Logger,
    private readonly observe: TaskObserver,
  ) {}

  get inFlight(): number {
    return this.inflight.size;
  }

  /** A new task id (also the native cancel id of its transfer). */
  newId(): number {
    return this.nextId++;
  }

  /** Tracks a submitted transfer as task `id` of `s`; `finish` does the store's bookkeeping once it ends. */
  track(
    s: Session,
    direction: Direction,
    blocks: number,
    id: number,
    started: Promise<TransferResult>,
    finish: (r: TransferResult, id: number) => Finished | Promise<Finished>,
    nativeBlocks = blocks,
  ): { task: number } {
    const done = started.then(async (r) => {
      const f = await finish(r, id);
      const status = f.status.map((x) => WIRE[x]);
      this.observe(direction, f.elapsed, f.status.filter((x) => x === BlockStatus.Ok).length, f.bytes);
      const failed: number[] = [];
      status.forEach((x, i) => {
        if (x !== "ok" && x !== "skipped") failed.push(i);
      });
      return { done: true as const, direction, status, errno: f.errno, failed, bytes: f.bytes, elapsed_s: f.elapsed, line: f.line };
    });
    const task: Task = { id, direction, nativeBlocks, done: undefined as unknown as Promise<unknown> };
    const settle = done.then(
      (r) => {
        task.result = r;
        this.trimFinished(s);
      },
      (e: Error) => {
        this.log.error(`task ${id} failed: ${e.message}`);
        // Every block failed: a client that reads only `failed` (or counts statuses) never takes one as moved.
        const all = Array.from({ length: blocks }, (_, i) => i);
        task.result = {
          done: true,
          direction,
          status: all.map(() => "io_error"),
          errno: all.map(() => 5),
          failed: all,
          bytes: 0,
          elapsed_s: 0,
          line: "",
        };
      },
    );
    task.done = settle; // settles once task.result is set
    this.inflight.add(settle);
    void settle.finally(() => this.inflight.delete(settle));
    s.tasks.set(id, task);
    return { task: id };
  }

  private trimFinished(s: Session): void {
    let finished = 0;
    for (const t of s.tasks.values()) if (t.result) finished++;
    if (finished <= MAX_FINISHED_TASKS) return;
    for (const [id, t] of s.tasks) {
      if (finished <= MAX_FINISHED_TASKS) break;
      if (t.result) {
        s.tasks.delete(id);
        finished--;
      }
    }
  }

  private find(s: Session, req: TaskRequest): Task {
    const t = s.tasks.get(req.task);
    if (!t) throw new ProtocolError("unknown_task", `task ${req.task} is not a task of this client (or its result was already collected)`);
    return t;
  }

  check(s: Session, req: TaskRequest): TaskResult | Running {
    const t = this.find(s, req);
    if (!t.result) return this.running(t);
    t.seenAt ??= Date.now();
    return t.result;
  }

  async wait(s: Session, req: WaitRequest): Promise<TaskResult | Running> {
    const t = this.find(s, req);
    if (!t.result) await settledWithin([t.done], req.timeoutMs);
    if (!t.result) return this.running(t);
    t.seenAt ??= Date.now();
    return t.result;
  }

  /**
   * A task not done yet; a dump says whether every block is done with the client's memory (copied into staging,
   * failed or dropped): the client may then reuse that memory though the writes go on.
   */
  private running(t: Task): Running {
    if (t.direction !== "D2S") return { done: false };
    const n = this.native.released(t.id);
    return { done: false, released: n < 0 || n >= t.nativeBlocks };
  }

  /**
   * Stops a running task: queued blocks and loads not yet copied end as
   * `cancelled`. The reply comes once no block of the task can write the
   * client's memory any more (a client that gave up on a load must know its
   * KV blocks are left alone before it reuses them). A finished task is left
   * as it is: `{cancelled: false, done: true}`.
   */
  async cancel(s: Session, req: TaskRequest): Promise<{ cancelled: boolean; done: boolean }> {
    const t = this.find(s, req);
    if (t.result) return { cancelled: false, done: true };
    const outcome = await this.native.cancel(t.id, CANCEL_TIMEOUT_MS);
    if (outcome === "timeout") throw new ProtocolError("busy", `task ${t.id}: a block copy did not end within ${CANCEL_TIMEOUT_MS} ms`);
    // "finished": every block is past its copy (its result is on the way).
    return { cancelled: outcome === "stopped", done: t.result !== undefined };
  }

  /** Forgets results the client has seen more than SEEN_RESULT_TTL_MS ago. */
  sweepSeen(s: Session, now: number): void {
    for (const [id, t] of s.tasks) if (t.seenAt !== undefined && now - t.seenAt > SEEN_RESULT_TTL_MS) s.tasks.delete(id);
  }

  /** Waits for the running tasks: at most `timeoutMs`, or until all have ended when none is given. */
  async drain(timeoutMs?: number): Promise<void> {
    if (this.inflight.size === 0) return;
    if (timeoutMs === undefined) await Promise.allSettled([...this.inflight]);
    else await settledWithin([...this.inflight], timeoutMs);
  }
}

/** Resolves once all `ps` have settled or `ms` have passed, whichever is first (the promises still run). */
function settledWithin(ps: Promise<unknown>[], ms: number): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, ms);
  });
  return Promise.race([Promise.allSettled(ps), expired]).then(() => clearTimeout(timer));
}
