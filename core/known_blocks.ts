// Blocks recently seen committed, per namespace: the lookup fast path. It is
// a cache in front of the filesystem (which stays the truth): an entry only
// saves a stat, and a stale one costs a miss on load, never wrong bytes.
//
// Keys are bucketed by a 32-bit mix of their first and last four bytes and
// confirmed with a byte comparison, so the hot path builds no strings.

interface Entry {
  key: Buffer; // a private copy: never a view into a received message
  seenAt: number;
  next?: Entry;
}

function bucketOf(key: Buffer): number {
  const n = key.length;
  if (n >= 4) return (key.readUInt32LE(0) ^ Math.imul(key.readUInt32LE(n - 4), 0x9e3779b1)) >>> 0;
  let h = 0x811c9dc5;
  for (let i = 0; i < n; i++) h = Math.imul(h ^ key[i], 0x01000193) >>> 0;
  return h;
}

/** Byte equality without a native call (keys are at most 64 bytes). */
function same(a: Buffer, b: Buffer): boolean {
  const n = a.length;
  if (n !== b.length) return false;
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return false;
  return true;
}

export class KnownBlocks {
  private readonly spaces = new Map<string, Map<number, Entry>>();
  private count = 0;

  constructor(private readonly maxEntries: number) {}

  get size(): number {
    return this.count;
  }

  /** When the block was last seen committed, or undefined. */
  seenAt(ns: string, key: Buffer): number | undefined {
    for (let e = this.spaces.get(ns)?.get(bucketOf(key)); e; e = e.next) if (same(e.key, key)) return e.seenAt;
    return undefined;
  }

  remember(ns: string, key: Buffer, now: number): void {
    let space = this.spaces.get(ns);
    if (!space) this.spaces.set(ns, (space = new Map()));
    const b = bucketOf(key);
    const head = space.get(b);
    for (let e = head; e; e = e.next) {
      if (same(e.key, key)) {
        e.seenAt = now;
        return;
      }
    }
    if (this.count >= this.maxEntries) {
      // Bounded memory: start over rather than track recency per entry.
      this.spaces.clear();
      this.count = 0;
      return this.remember(ns, key, now);
    }
    space.set(b, { key: Buffer.from(key), seenAt: now, next: head });
    this.count++;
  }

  /** Forgets everything (blocks were evicted: any of them may be gone). */
  clear(): void {
    this.spaces.clear();
    this.count = 0;
  }

  forget(ns: string, key: Buffer): void {
    const space = this.spaces.get(ns);
    if (!space) return;
    const b = bucketOf(key);
    let prev: Entry | undefined;
    for (let e = space.get(b); e; prev = e, e = e.next) {
      if (!same(e.key, key)) continue;
      if (prev) prev.next = e.next;
      else if (e.next) space.set(b, e.next);
      else space.delete(b);
      this.count--;
      return;
    }
  }
}
