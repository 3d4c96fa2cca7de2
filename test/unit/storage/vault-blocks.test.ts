import crypto from "node:crypto";
import { VaultBlocks } from "../../../src/storage/vault/block-cache";
import type { ChunkReader } from "../../../src/storage/vault/reader";

const BLOCK = 64 * 1024;
const hashOf = (n: number) => crypto.createHash("sha256").update(String(n)).digest();

/** A reader over chunks whose bytes are their number repeated, counting what it is asked for. */
function countingReader() {
  const asked: string[][] = [];
  const byHash = new Map<string, number>();
  for (let n = 0; n < 100; n++) byHash.set(hashOf(n).toString("hex"), n);
  const reader = {
    async *readRuns(projectId: string, hashes: Buffer[]) {
      asked.push(hashes.map((h) => `${projectId}:${byHash.get(h.toString("hex"))}`));
      await new Promise((r) => setTimeout(r, 5));
      const data = Buffer.alloc(hashes.length * BLOCK);
      hashes.forEach((h, k) => data.fill(byHash.get(h.toString("hex"))!, k * BLOCK, (k + 1) * BLOCK));
      yield { hashes, data };
    },
  };
  return { reader: reader as unknown as ChunkReader, asked };
}

describe("VaultBlocks", () => {
  it("reads each chunk once for readers that ask together, and keeps it for later readers", async () => {
    const { reader, asked } = countingReader();
    const blocks = new VaultBlocks(reader, 10 * BLOCK);
    const [a, b] = await Promise.all([blocks.read("p", [hashOf(1), hashOf(2)]), blocks.read("p", [hashOf(2), hashOf(1)])]);
    expect(asked).toEqual([["p:1", "p:2"]]);
    expect([a[0][0], a[1][0], b[0][0], b[1][0]]).toEqual([1, 2, 2, 1]);
    await blocks.read("p", [hashOf(1)]);
    expect(asked).toHaveLength(1);
    // Another project's read of the same chunk is its own.
    await blocks.read("q", [hashOf(1)]);
    expect(asked[1]).toEqual(["q:1"]);
  });

  it("holds at most its bytes, dropping the least recently used first", async () => {
    const { reader, asked } = countingReader();
    const blocks = new VaultBlocks(reader, 3 * BLOCK);
    await blocks.read("p", [hashOf(1), hashOf(2), hashOf(3)]);
    await blocks.read("p", [hashOf(1)]); // 1 is now the most recently used
    await blocks.read("p", [hashOf(4)]); // 2 goes
    expect(blocks.size).toBe(3 * BLOCK);
    asked.length = 0;
    await blocks.read("p", [hashOf(1), hashOf(3), hashOf(4)]);
    expect(asked).toEqual([]);
    await blocks.read("p", [hashOf(2)]);
    expect(asked).toEqual([["p:2"]]);
  });

  it("reads ahead half a window at a time, apart from the read that asked", async () => {
    const { reader, asked } = countingReader();
    const blocks = new VaultBlocks(reader, 100 * BLOCK);
    const window = (from: number) => Array.from({ length: 8 }, (_, k) => hashOf(from + k));
    await blocks.read("p", [hashOf(0)], window(1));
    expect(asked).toEqual([["p:0"], ["p:1", "p:2", "p:3", "p:4", "p:5", "p:6", "p:7", "p:8"]]);
    await new Promise((r) => setTimeout(r, 20));
    asked.length = 0;
    // Most of the next window is kept already: nothing more is read ahead.
    expect((await blocks.read("p", [hashOf(1)], window(2)))[0][0]).toBe(1);
    expect(asked).toEqual([]);
    // Half of it is not: that half comes in one read.
    await blocks.read("p", [hashOf(5)], window(6));
    expect(asked).toEqual([["p:9", "p:10", "p:11", "p:12", "p:13"]]);
  });

  it("passes a failed read to every reader waiting for it, and reads again next time", async () => {
    const { reader } = countingReader();
    let fail = true;
    const failing = {
      readRuns(projectId: string, hashes: Buffer[]) {
        if (fail) {
          fail = false;
          return (async function* () {
            await new Promise((r) => setTimeout(r, 5));
            throw new Error("chunk is corrupt");
            yield { hashes, data: Buffer.alloc(0) };
          })();
        }
        return reader.readRuns(projectId, hashes);
      },
    } as unknown as ChunkReader;
    const blocks = new VaultBlocks(failing, 10 * BLOCK);
    const both = await Promise.allSettled([blocks.read("p", [hashOf(7)]), blocks.read("p", [hashOf(7)])]);
    expect(both.map((r) => r.status)).toEqual(["rejected", "rejected"]);
    expect((await blocks.read("p", [hashOf(7)]))[0][0]).toBe(7);
  });
});
