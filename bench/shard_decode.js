// Time of decoding a dump's shard columns (wire bin -> typed arrays), this build
// against another build's dist/ (e.g. a clone at an older commit):
//   node bench/shard_decode.js <other checkout>
const path = require("path");
const other = process.argv[2];
if (!other) {
  console.error("usage: node bench/shard_decode.js <checkout whose dist/ to compare with>");
  process.exit(2);
}
const [newP, oldP] = [require(path.join(__dirname, "../dist/core/protocol.js")), require(path.resolve(other, "dist/core/protocol.js"))];
for (const [blocks, count] of [
  [512, 64],
  [4096, 64],
  [1024, 1],
]) {
  const n = blocks * count;
  const msg = {
    shards: { count, region: new Uint8Array(4 * n).fill(1), offset: new Uint8Array(8 * n).fill(0), length: new Uint8Array(8 * n) },
  };
  const dv = new DataView(msg.shards.length.buffer);
  for (let i = 0; i < n; i++) dv.setUint32(i * 8, 4096, true);
  const res = {};
  for (const [name, P] of [
    ["other", oldP],
    ["this", newP],
    ["other", oldP],
    ["this", newP],
  ]) {
    const t0 = process.hrtime.bigint();
    const reps = 20;
    for (let r = 0; r < reps; r++) P.reqShards(msg, blocks);
    res[name] = Number(process.hrtime.bigint() - t0) / 1e6 / reps;
  }
  console.log(`${blocks} blocks x ${count} shards (${n}): decode other ${res.other.toFixed(3)} ms, this ${res.this.toFixed(3)} ms`);
}
