import fs from "node:fs";
import path from "node:path";
import { openRaw, writeRaw } from "../../../src/formats/raw";
import { BLOCK_SIZE, dataRangesOf, DEFAULT_LIMITS, FormatError, isHole, materialize, type ByteRange, type ImageReader, type WriteSource, type WriterPiece } from "../../../src/formats/types";
import { blocksSource, bufferSource, bytesOf, fileSource, memorySource, pattern, pwrite, readAll, sampleDisk, tmpDir, withDataRanges, writeFile } from "../../helpers/formats";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

let tmp: ReturnType<typeof tmpDir>;
beforeAll(() => {
  tmp = tmpDir("stowage-raw-");
});
afterAll(() => tmp.cleanup());
const file = (name: string) => path.join(tmp.dir, name);

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

/** A reader's extents as [offset, length, first byte], copied out (extents are lent). */
async function extentList(reader: ImageReader) {
  const out: Array<[number, number, number]> = [];
  for await (const e of reader.extents()) out.push([e.offset, e.data.length, e.data[0]]);
  return out;
}

describe("openRaw", () => {
  /** A sparse file of `size` bytes with `writes` in it; returns where they went, as a stand-in for SEEK_DATA would. */
  function sparseFile(name: string, size: number, writes: Array<{ offset: number; data: Buffer }>): ByteRange[] {
    const fd = fs.openSync(file(name), "w");
    for (const w of writes) pwrite(fd, w.data, w.offset);
    fs.ftruncateSync(fd, size);
    fs.closeSync(fd);
    return writes.map((w) => ({ offset: w.offset, length: w.data.length }));
  }

  const writes = [
    { offset: 0, data: pattern(4096, 1) },
    { offset: 3 * MiB + 100, data: pattern(100, 2) }, // inside one block, not at its start
    { offset: 5 * MiB - 1000, data: pattern(2000, 3) }, // across a block and a megabyte boundary
    { offset: 9 * MiB, data: Buffer.alloc(3 * BLOCK_SIZE) }, // written, but zeros
    { offset: 9 * MiB + 3 * BLOCK_SIZE, data: pattern(BLOCK_SIZE, 4) },
    { offset: 64 * MiB - 10, data: pattern(10, 5) }, // the file's last bytes
  ];
  const expected = [
    [0, BLOCK_SIZE, pattern(1, 1)[0]],
    [3 * MiB, BLOCK_SIZE, 0],
    // (Extents end where the reader's 1 MiB reads do.)
    [5 * MiB - BLOCK_SIZE, BLOCK_SIZE, 0],
    [5 * MiB, BLOCK_SIZE, pattern(2000, 3)[1000]],
    [9 * MiB + 3 * BLOCK_SIZE, BLOCK_SIZE, pattern(1, 4)[0]],
    [64 * MiB - BLOCK_SIZE, BLOCK_SIZE, 0],
  ];

  it("reads a sparse file alike with and without the source's data ranges, and with them reads only those", async () => {
    const ranges = sparseFile("sparse.raw", 64 * MiB, writes);
    const whole = fileSource(file("sparse.raw"));
    const plainReader = openRaw(whole, DEFAULT_LIMITS);
    expect(await extentList(plainReader)).toEqual(expected);
    const plain = await readAll(plainReader);
    whole.close();
    expect(whole.bytesRead).toBe(2 * 64 * MiB);

    const inner = fileSource(file("sparse.raw"));
    const reader = openRaw(withDataRanges(inner, ranges), DEFAULT_LIMITS);
    const extents = await extentList(reader);
    expect(inner.bytesRead).toBe(writes.reduce((n, w) => n + w.data.length, 0));
    // Extents start where the data ranges do (and end where the 1 MiB reads do); the disk they make is the same.
    expect(extents.reduce((n, [, length]) => n + length, 0)).toBe(4096 + 100 + 2000 + BLOCK_SIZE + 10);
    expect((await readAll(reader)).equals(plain)).toBe(true);
    inner.close();
  });

  it("reads nothing of a file that is one hole", async () => {
    sparseFile("hole.raw", 256 * MiB, []);
    const src = fileSource(file("hole.raw"));
    expect(await extentList(openRaw(withDataRanges(src, []), DEFAULT_LIMITS))).toEqual([]);
    src.close();
    expect(src.bytesRead).toBe(0);
  });

  it("takes a source's broken data ranges for a bug (an Error), not for a bad file", async () => {
    const src = bufferSource(Buffer.alloc(4 * MiB, 1));
    const backwards = Object.assign(src, {
      async *dataRanges() {
        yield { offset: 2 * MiB, length: 10 };
        yield { offset: MiB, length: 10 };
      },
    });
    const err = await extentList(openRaw(backwards, DEFAULT_LIMITS)).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect(err).not.toBeInstanceOf(FormatError);
    expect((err as Error).message).toMatch(/data range 1048576\+10 is out of order/);
  });
});

describe("dataRangesOf", () => {
  const ranges = async (list: ByteRange[], offset: number, length: number, align?: number) => {
    const src = withDataRanges(bufferSource(Buffer.alloc(0)), list);
    const out: Array<[number, number]> = [];
    for await (const r of dataRangesOf(src, offset, length, align)) out.push([r.offset, r.length]);
    return out;
  };

  it("widens ranges to the alignment, clips them to the range asked for, and merges those that touch", async () => {
    const list = [
      { offset: 10, length: 20 },
      { offset: 30, length: 5 },
      { offset: 200, length: 1 },
      { offset: 230, length: 1 },
      { offset: 600, length: 20 },
    ];
    expect(await ranges(list, 0, 700)).toEqual([
      [10, 25],
      [200, 1],
      [230, 1],
      [600, 20],
    ]);
    expect(await ranges(list, 0, 700, 64)).toEqual([
      [0, 64],
      [192, 64],
      [576, 64],
    ]);
    expect(await ranges(list, 20, 590, 64)).toEqual([
      [20, 44],
      [192, 64],
      [576, 34],
    ]);
    expect(await ranges(list, 300, 200, 64)).toEqual([]);
  });

  it("is the whole range for a source that does not know its holes", async () => {
    const out: ByteRange[] = [];
    for await (const r of dataRangesOf(bufferSource(Buffer.alloc(10)), 3, 5, 64)) out.push(r);
    expect(out).toEqual([{ offset: 3, length: 5 }]);
  });
});
