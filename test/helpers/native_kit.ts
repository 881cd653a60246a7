// Blocks for the tests of the native core through its binding (no engine
// process): shared memory regions opened in the addon, and the shard list of
// a dump or load of some of their blocks into files named in a directory.
import * as path from "path";
import { NativeEngine, ShardListBuilder } from "../../core/native";
import { ShmRegion } from "./fixtures";

export const DIGEST = 0x1234_5678_9abc_def0n;

export interface Layout {
  regions: ShmRegion[];
  ids: number[];
  /** per block: its shards */
  blocks: Array<Array<[number, number, number]>>;
}

/** nblocks blocks, each with one shard per region (like one per layer). */
export function layout(engine: NativeEngine, nregions: number, nblocks: number, shardBytes: number, fill: "random" | "zero"): Layout {
  const regions = Array.from({ length: nregions }, () => new ShmRegion(nblocks * shardBytes, fill));
  const ids = regions.map((r) => engine.openHostRegion(r.name, r.size));
  const blocks = Array.from({ length: nblocks }, (_, b) => ids.map((id) => [id, b * shardBytes, shardBytes] as [number, number, number]));
  return { regions, ids, blocks };
}

export function spec(dir: string, l: Layout, names: string[], digest = DIGEST) {
  const builder = new ShardListBuilder();
  l.blocks.forEach((shards, b) => builder.addBlock(path.join(dir, names[b]), shards));
  return builder.build(digest);
}
