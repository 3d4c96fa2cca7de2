import fs from "node:fs";
import path from "node:path";
import { writeRaw } from "../../../src/formats/raw";
import { BLOCK_SIZE, isHole, materialize, type WriteSource, type WriterPiece } from "../../../src/formats/types";
import { bytesOf, memorySource, sampleDisk, tmpDir, writeFile } from "../../helpers/formats";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

let tmp: ReturnType<typeof tmpDir>;
beforeAll(() => {
  tmp = tmpDir("stowage-raw-");
});
afterAll(() => tmp.cleanup());
const file = (name: string) => path.join(tmp.dir, name);

/** A disk of `size` bytes holding the given blocks. */
function blocksSource(size: number, blocks: Map<number, Buffer>): WriteSource {
  return {
    virtualSize: size,
    async *allocated() {
      yield* blocks.keys();
    },
    async *blocks() {
      for (const [index, data] of blocks) yield { index, data };
    },
  };
}

/** The pieces a writer yields, bytes shown by length and first byte, holes by size. */
async function shapes(pieces: AsyncIterable<WriterPiece>) {
  const out: Array<{ hole: number } | [number, number]> = [];
  for await (const p of pieces) out.push(isHole(p) ? { hole: p.hole } : [p.length, p[0]]);
  return out;
}

/** Bytes of a file that take disk space (its holes take none). */
const allocatedBytes = (name: string) => fs.statSync(name).blocks * 512;

describe("writeRaw", () => {
  it("yields holes for the blocks the disk does not have, and for blocks of zeros", async () => {
    const blocks = new Map([
      [1, Buffer.alloc(BLOCK_SIZE, 0x11)],
      [2, Buffer.alloc(BLOCK_SIZE)], // allocated, but zeros
      [3, Buffer.alloc(BLOCK_SIZE, 0x33)],
      [7, Buffer.alloc(BLOCK_SIZE, 0x77)],
    ]);
    expect(await shapes(writeRaw(blocksSource(10 * BLOCK_SIZE, blocks)))).toEqual([
      { hole: BLOCK_SIZE },
      [BLOCK_SIZE, 0x11],
      { hole: BLOCK_SIZE },
      [BLOCK_SIZE, 0x33],
      { hole: 3 * BLOCK_SIZE },
      [BLOCK_SIZE, 0x77],
      { hole: 2 * BLOCK_SIZE },
    ]);
  });

  it("cuts the last block at the disk's end and counts a short block's missing bytes as zeros", async () => {
    const size = 3 * BLOCK_SIZE + 1000;
    const blocks = new Map([
      [0, Buffer.alloc(100, 0x44)],
      [3, Buffer.alloc(BLOCK_SIZE, 0x55)],
    ]);
    const pieces = await shapes(writeRaw(blocksSource(size, blocks)));
    expect(pieces).toEqual([[100, 0x44], { hole: 3 * BLOCK_SIZE - 100 }, [1000, 0x55]]);
    const bytes = await bytesOf(writeRaw(blocksSource(size, blocks)));
    const expected = Buffer.alloc(size);
    expected.fill(0x44, 0, 100);
    expected.fill(0x55, 3 * BLOCK_SIZE);
    expect(bytes.equals(expected)).toBe(true);
  });

  it("an empty disk is one hole; a 0-byte disk is nothing", async () => {
    expect(await shapes(writeRaw(blocksSource(5 * MiB + 3, new Map())))).toEqual([{ hole: 5 * MiB + 3 }]);
    expect(await shapes(writeRaw(blocksSource(0, new Map())))).toEqual([]);
  });

  it("materialized, its output is the disk byte for byte", async () => {
    const disk = sampleDisk(6 * MiB + 700, 4);
    const parts: Buffer[] = [];
    for await (const b of materialize(writeRaw(memorySource(disk)))) parts.push(Buffer.from(b));
    expect(Buffer.concat(parts).equals(disk)).toBe(true);
    // Holes longer than materialize's shared zeros come out in pieces.
    let total = 0;
    for await (const b of materialize(writeRaw(blocksSource(3 * MiB + 5, new Map())))) {
      expect(b.length).toBeLessThanOrEqual(MiB);
      expect(b.every((x) => x === 0)).toBe(true);
      total += b.length;
    }
    expect(total).toBe(3 * MiB + 5);
  });

  it("written by a sparse sink, a disk ending in a hole is a file of the disk's size that stores only the data", async () => {
    const size = 20 * GiB;
    const blocks = new Map([
      [0, Buffer.alloc(BLOCK_SIZE, 0x61)],
      [(8 * GiB) / BLOCK_SIZE, Buffer.alloc(BLOCK_SIZE, 0x62)],
      [(8 * GiB) / BLOCK_SIZE + 1, Buffer.alloc(BLOCK_SIZE, 0x63)],
    ]);
    const out = file("20g.raw");
    expect(await writeFile(out, writeRaw(blocksSource(size, blocks)), { maxBytes: MiB })).toBe(size);
    expect(fs.statSync(out).size).toBe(size);
    expect(allocatedBytes(out)).toBeLessThan(4 * MiB);
    const fd = fs.openSync(out, "r");
    try {
      for (const [index, data] of blocks) {
        const got = Buffer.alloc(BLOCK_SIZE);
        fs.readSync(fd, got, 0, BLOCK_SIZE, index * BLOCK_SIZE);
        expect(got.equals(data)).toBe(true);
      }
    } finally {
      fs.closeSync(fd);
    }
    fs.rmSync(out);
  });

  it("refuses blocks out of order or past the disk's end", async () => {
    const twice = blocksSource(4 * BLOCK_SIZE, new Map([[2, Buffer.alloc(BLOCK_SIZE, 1)]]));
    const back: WriteSource = {
      ...twice,
      async *blocks() {
        yield { index: 2, data: Buffer.alloc(BLOCK_SIZE, 1) };
        yield { index: 1, data: Buffer.alloc(BLOCK_SIZE, 1) };
      },
    };
    await expect(bytesOf(writeRaw(back))).rejects.toThrow(/block index 1 is out of order/);
    await expect(bytesOf(writeRaw(blocksSource(4 * BLOCK_SIZE, new Map([[4, Buffer.alloc(BLOCK_SIZE, 1)]]))))).rejects.toThrow(/past the 262144-byte disk/);
  });
});
