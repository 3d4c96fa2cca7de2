import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { openImage, WRITERS } from "../../../src/formats";
import { DEFAULT_LIMITS, FormatError, type FormatName, type ImageReader, type WriteSource } from "../../../src/formats/types";
import {
  allocatedBytes,
  extentsToRaw,
  fileDataRanges,
  fileSource,
  blocksSource,
  fixedVhdFile,
  pattern,
  qemu,
  qemuImg,
  sparseFile,
  tmpDir,
  vhdFile,
  vmdkFile,
  withDataRanges,
  writeFile,
} from "../../helpers/formats";

/*
 * Disk images at real sizes: files above 2^31 and 2^32 bytes with data placed
 * beyond those offsets in the file and on the disk, and disks of 1 TiB. Every
 * fixture is sparse: its holes cost no disk space, so each is made in well under a
 * second. What the readers yield is checked against qemu-img reading the same file.
 */

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const TWO31 = 2 ** 31;
const TWO32 = 2 ** 32;

let tmp: ReturnType<typeof tmpDir>;
beforeAll(() => {
  tmp = tmpDir("stowage-large-");
});
afterAll(() => tmp.cleanup());
const file = (name: string) => path.join(tmp.dir, name);

const qemuIo = (args: string[]) => execFileSync("/usr/bin/qemu-io", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

/** A 6 GiB disk's data: at its start, across 2^31, across 2^32, and beyond 2^32. */
const SIZE = 6 * GiB;
const PIECES = [
  { offset: 0, data: pattern(64 * KiB, 1) },
  { offset: TWO31 - 64 * KiB, data: pattern(128 * KiB, 2) },
  { offset: TWO32 - 64 * KiB, data: pattern(128 * KiB, 3) },
  { offset: 5 * GiB + MiB, data: pattern(64 * KiB, 4) },
];

/**
 * Checks that qemu-img reads `image` as the disk `reader` yields: same virtual size,
 * and `qemu-img compare` finds it identical to a sparse raw file of the extents. With
 * `data`, also that the disk holds exactly those bytes. Where qemu-img would take
 * long to compare (half a minute on a 1 TiB VMDK whose grain tables are all laid
 * out, or on 4 GiB of allocated VHD blocks that are holes), `check` has it agree
 * on the image's map, or compare just the windows that hold data.
 */
async function expectSameAsQemu(image: string, qemuFormat: string, reader: ImageReader, opts: { data?: Array<{ offset: number; data: Buffer }>; check?: "compare" | "map" | "windows" } = {}) {
  const raw = `${image}.extents.raw`;
  const got = await extentsToRaw(reader, raw);
  try {
    const info = JSON.parse(qemu(["info", "--output=json", "-f", qemuFormat, image])) as Record<string, unknown>;
    expect(info["virtual-size"]).toBe(reader.virtualSize);
    if (opts.check === "map") {
      const map = JSON.parse(qemu(["map", "--output=json", "-f", qemuFormat, image])) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
      expect(map.filter((m) => m.data && !m.zero).map((m) => [m.start, m.length])).toEqual(got.extents);
    } else if (opts.check === "windows") {
      for (const [offset, length] of got.extents) compareWindow(image, qemuFormat, raw, offset, length);
    } else {
      expect(qemu(["compare", "-f", qemuFormat, "-F", "raw", image, raw])).toMatch(/Images are identical/);
    }
    if (opts.data) {
      const fd = fs.openSync(raw, "r");
      try {
        for (const d of opts.data) {
          const buf = Buffer.alloc(d.data.length);
          fs.readSync(fd, buf, 0, buf.length, d.offset);
          expect(buf.equals(d.data)).toBe(true);
        }
      } finally {
        fs.closeSync(fd);
      }
      expect(got.bytes).toBe(opts.data.reduce((n, d) => n + d.data.length, 0));
    }
  } finally {
    fs.rmSync(raw);
  }
  return got;
}

/** qemu-img compare of bytes [offset, offset + length) of `image` and of the raw file `raw`: "Images are identical". */
function compareWindow(image: string, qemuFormat: string, raw: string, offset: number, length: number) {
  const window = `driver=raw,offset=${offset},size=${length}`;
  const opts = [`${window},file.driver=${qemuFormat},file.file.driver=file,file.file.filename=${image}`, `${window},file.driver=file,file.filename=${raw}`];
  expect(qemu(["compare", "--image-opts", ...opts])).toMatch(/Images are identical/);
}

/** qemu-img check finds no errors, leaks or corruptions. */
function expectCleanCheck(image: string, qemuFormat: string) {
  const out = JSON.parse(qemu(["check", "--output=json", "-f", qemuFormat, image])) as Record<string, unknown>;
  expect(out["check-errors"] ?? 0).toBe(0);
  expect(out["corruptions"] ?? 0).toBe(0);
  expect(out["leaks"] ?? 0).toBe(0);
}

/** Opens `image` from a file, reads it through qemu's eyes and ours; returns the extents and the bytes read. */
async function readBig(
  image: string,
  format: FormatName,
  qemuFormat: string,
  opts: { dataRanges?: boolean; data?: Array<{ offset: number; data: Buffer }>; check?: "compare" | "map" | "windows" } = {},
) {
  const plain = fileSource(image);
  const src = opts.dataRanges ? withDataRanges(plain, fileDataRanges(image)) : plain;
  try {
    const reader = await openImage(format, src, DEFAULT_LIMITS);
    const got = await expectSameAsQemu(image, qemuFormat, reader, opts);
    return { reader, ...got, bytesRead: plain.bytesRead };
  } finally {
    plain.close();
  }
}

/** Some of the file offsets lie between 2^31 and 2^32, some beyond 2^32. */
const beyond = (offsets: number[]) => {
  expect(offsets.some((o) => o > TWO31 && o < TWO32)).toBe(true);
  expect(offsets.some((o) => o > TWO32)).toBe(true);
};

describe("files above 2^31 and 2^32 bytes, data beyond both", () => {
  test("QCOW2: clusters preallocated through the file, data written far into it", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file("far.qcow2");
    // Every cluster allocated in order (so the disk's offsets are about the file's), all zero-flagged but those written.
    qemu(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", image, String(SIZE)]);
    const writes = PIECES.flatMap((p, k) => {
      fs.writeFileSync(file(`piece${k}`), p.data);
      return ["-c", `write -q -s ${file(`piece${k}`)} ${p.offset} ${p.data.length}`];
    });
    qemuIo(["-f", "qcow2", "-c", `write -q -z -n 0 ${SIZE}`, ...writes, image]);
    expect(fs.statSync(image).size).toBeGreaterThan(SIZE);
    expectCleanCheck(image, "qcow2");
    const map = JSON.parse(qemu(["map", "--output=json", "-f", "qcow2", image])) as Array<{ start: number; data: boolean; offset?: number }>;
    beyond(map.filter((m) => m.data).map((m) => m.offset!));

    const { reader, bytesRead } = await readBig(image, "QCOW2", "qcow2", { data: PIECES });
    expect(reader.virtualSize).toBe(SIZE);
    expect(bytesRead).toBeLessThan(4 * MiB);
  });

  test("QCOW2: clusters preallocated but never written are skipped unread when the source knows its holes", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file("prealloc.qcow2");
    // Without zero flags: every cluster of the disk is allocated, the file's holes are all that tell they hold zeros.
    qemu(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", image, String(SIZE)]);
    const writes = PIECES.flatMap((p, k) => {
      fs.writeFileSync(file(`piece${k}`), p.data);
      return ["-c", `write -q -s ${file(`piece${k}`)} ${p.offset} ${p.data.length}`];
    });
    qemuIo(["-f", "qcow2", ...writes, image]);
    expectCleanCheck(image, "qcow2");
    const { bytesRead } = await readBig(image, "QCOW2", "qcow2", { dataRanges: true, data: PIECES });
    expect(bytesRead).toBeLessThan(4 * MiB);
  });

  test.each([
    ["monolithicSparse", false],
    ["streamOptimized", true],
  ])("VMDK %s: grains placed across 2^31 and 2^32 in the file", async (variant, stream) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file(`far-${variant}.vmdk`);
    // Grains of 64 KiB; each piece's grains consecutive in the file, the first
    // straddling the boundary, the last piece's grain at 5 GiB and a few sectors.
    const at = [MiB, TWO31 - 32 * KiB, TWO32 - 32 * KiB, 5 * GiB + 7 * 512];
    const grains = PIECES.flatMap((p, k) => {
      const out = [];
      // A streamOptimized grain takes what it deflates to: random data a little more than a grain.
      for (let o = 0; o < p.data.length; o += 64 * KiB) out.push({ offset: p.offset + o, data: p.data.subarray(o, o + 64 * KiB), at: at[k] + (o / (64 * KiB)) * (stream ? 66 * KiB : 64 * KiB) });
      return out;
    });
    vmdkFile(image, { size: SIZE, stream, grains });
    expect(fs.statSync(image).size).toBeGreaterThan(5 * GiB);
    expectCleanCheck(image, "vmdk");

    const { reader, bytesRead } = await readBig(image, "VMDK", "vmdk", { data: PIECES });
    expect(reader.variant).toBe(variant);
    expect(reader.virtualSize).toBe(SIZE);
    expect(bytesRead).toBeLessThan(8 * MiB);
  });

  test("VHD dynamic: blocks placed across 2^31 and 2^32 in the file", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file("far-dynamic.vhd");
    // Two-MiB blocks (plus their 512-byte bitmaps); a piece across a disk boundary spans two blocks.
    const blockAt = [MiB, TWO31 - MiB, TWO32 - MiB, 5 * GiB + 3 * 512];
    const blocks = PIECES.flatMap((p, k) => {
      const out = [];
      for (let o = 0; o < p.data.length; o += 64 * KiB) {
        const offset = p.offset + o;
        const block = Math.floor(offset / (2 * MiB)) - Math.floor(p.offset / (2 * MiB));
        out.push({ offset, data: p.data.subarray(o, o + 64 * KiB), at: blockAt[k] + block * (2 * MiB + 512) });
      }
      return out;
    });
    vhdFile(image, { size: SIZE, blocks });
    expect(fs.statSync(image).size).toBeGreaterThan(5 * GiB);

    const { reader, bytesRead } = await readBig(image, "VHD", "vpc", { data: PIECES });
    expect(reader.variant).toBe("dynamic");
    expect(reader.virtualSize).toBe(SIZE);
    // Every allocated block is read whole (six of 2 MiB)...
    expect(bytesRead).toBeGreaterThan(12 * MiB);
    expect(bytesRead).toBeLessThan(13 * MiB);
    // ...unless the source knows which parts of them are holes.
    const sparse = await readBig(image, "VHD", "vpc", { dataRanges: true, data: PIECES });
    expect(sparse.bytesRead).toBeLessThan(2 * MiB);
  });

  test("VHD fixed: a disk of 6 GiB with data across both boundaries, read only where it has data", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file("far-fixed.vhd");
    fixedVhdFile(image, SIZE, PIECES);
    expect(fs.statSync(image).size).toBe(SIZE + 512);

    const { reader, bytesRead } = await readBig(image, "VHD", "vpc", { dataRanges: true, data: PIECES });
    expect(reader.variant).toBe("fixed");
    expect(reader.virtualSize).toBe(SIZE);
    expect(bytesRead).toBeLessThan(2 * MiB);
  });

  test("RAW: a 6 GiB sparse file with data across both boundaries, read only where it has data", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file("far.raw");
    sparseFile(image, SIZE, PIECES);

    const { reader, bytesRead } = await readBig(image, "RAW", "raw", { dataRanges: true, data: PIECES });
    expect(reader.virtualSize).toBe(SIZE);
    expect(bytesRead).toBeLessThan(2 * MiB);
  });
});

describe("sparse disks of 1 TiB are read in time and reads proportional to their data", () => {
  const TiB = 2 ** 40;
  const DATA = [
    { offset: 0, data: pattern(64 * KiB, 11) },
    { offset: TWO32 - 64 * KiB, data: pattern(128 * KiB, 12) },
    { offset: 2 ** 39 + 3 * MiB, data: pattern(64 * KiB, 13) },
    { offset: TiB - 64 * KiB, data: pattern(64 * KiB, 14) },
  ];

  /** A 1 TiB image qemu-img creates, holding DATA written by qemu-io. */
  function qemuImage(name: string, format: string, options: string[] = []) {
    const image = file(name);
    qemu(["create", "-q", "-f", format, ...options, image, String(TiB)]);
    const writes = DATA.flatMap((p, k) => {
      fs.writeFileSync(file(`data${k}`), p.data);
      return ["-c", `write -q -s ${file(`data${k}`)} ${p.offset} ${p.data.length}`];
    });
    qemuIo(["-f", format, ...writes, image]);
    return image;
  }

  test("QCOW2", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = qemuImage("1t.qcow2", "qcow2");
    const { reader, bytesRead } = await readBig(image, "QCOW2", "qcow2", { data: DATA });
    expect(reader.virtualSize).toBe(TiB);
    // The header, a 16 KiB L1 table, four L2 tables and 320 KiB of data.
    expect(bytesRead).toBeLessThan(MiB);
  });

  test("VMDK monolithicSparse: the grain tables laid out up front (64 MiB) are skipped where the file has holes", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = qemuImage("1t.vmdk", "vmdk");
    const { reader, bytesRead } = await readBig(image, "VMDK", "vmdk", { dataRanges: true, data: DATA, check: "map" });
    expect(reader.virtualSize).toBe(TiB);
    expect(bytesRead).toBeLessThan(8 * MiB);

    // A source that does not know its holes has every table read: more metadata than the default limits allow.
    const src = fileSource(image);
    try {
      await expect(openImage("VMDK", src, DEFAULT_LIMITS)).rejects.toThrow(/grain directory and tables need more than the 67108864 bytes of metadata allowed/);
      const reader = await openImage("VMDK", src, { ...DEFAULT_LIMITS, maxMetadataBytes: 128 * MiB });
      const { extents } = await extentsToRaw(reader, file("1t-again.raw"));
      fs.rmSync(file("1t-again.raw"));
      expect(extents).toEqual(DATA.map((p) => [p.offset, p.data.length]));
      expect(src.bytesRead).toBeGreaterThan(64 * MiB);
    } finally {
      src.close();
    }
  });

  test("VHD dynamic", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = qemuImage("1t.vhd", "vpc", ["-o", "force_size=on"]);
    const { reader, bytesRead } = await readBig(image, "VHD", "vpc", { dataRanges: true, data: DATA });
    expect(reader.virtualSize).toBe(TiB);
    // The 2 MiB block allocation table, and the data.
    expect(bytesRead).toBeLessThan(3 * MiB);
  });

  test("RAW", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const image = file("1t.raw");
    sparseFile(image, TiB, DATA);
    const { reader, bytesRead } = await readBig(image, "RAW", "raw", { dataRanges: true, data: DATA });
    expect(reader.virtualSize).toBe(TiB);
    expect(bytesRead).toBeLessThan(MiB);
  });
});

describe("writers given a sparse 1 TiB disk write its data, not its size", () => {
  const TiB = 2 ** 40;
  const B = 64 * KiB;
  const at = [0, TWO31 / B - 1, TWO31 / B, TWO32 / B - 1, TWO32 / B, 2 ** 39 / B + 7, TiB / B - 1];
  const blocks = new Map(at.map((index, k) => [index, pattern(B, 20 + k)]));
  const source = blocksSource(TiB, blocks);
  const DATA = [...blocks].map(([index, data]) => ({ offset: index * B, data }));
  /** [offset, length] pairs, those that touch joined. */
  const merged = (list: number[][]) => {
    const out: number[][] = [];
    for (const [o, l] of list) {
      const last = out[out.length - 1];
      if (last && last[0] + last[1] === o) last[1] += l;
      else out.push([o, l]);
    }
    return out;
  };
  let reference: string;
  beforeAll(async () => {
    reference = file("reference-1t.raw");
    await writeFile(reference, WRITERS.RAW(source), { maxBytes: at.length * B });
  });

  test.each([
    ["QCOW2", "qcow2", 4 * MiB],
    ["VMDK", "vmdk", 2 * MiB],
    ["VHD", "vpc", 24 * MiB], // a 2 MiB table, and a 2 MiB block (mostly holes) for each piece of data
  ] as const)("%s", async (format, qemuFormat, bound) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const out = file(`written-1t.${qemuFormat}`);
    const size = await writeFile(out, WRITERS[format](source), { maxBytes: bound });
    expect(size).toBeLessThan(bound);
    expect(allocatedBytes(out)).toBeLessThan(4 * MiB);
    if (qemuFormat !== "vpc") expectCleanCheck(out, qemuFormat);
    const info = JSON.parse(qemu(["info", "--output=json", "-f", qemuFormat, out])) as Record<string, unknown>;
    expect(info["virtual-size"]).toBe(TiB);
    if (format === "VMDK") {
      // qemu-img compares a 1 TiB VMDK in about a minute: its map, and each piece of data, say the same in a second.
      const map = JSON.parse(qemu(["map", "--output=json", "-f", qemuFormat, out])) as Array<{ start: number; length: number; data: boolean }>;
      const mapped = map.filter((m) => m.data).map((m) => [m.start, m.length]);
      expect(mapped).toEqual(merged(DATA.map((d) => [d.offset, d.data.length])));
      for (const [offset, length] of mapped) compareWindow(out, qemuFormat, reference, offset, length);
    } else {
      expect(qemu(["compare", "-f", qemuFormat, "-F", "raw", out, reference])).toMatch(/Images are identical/);
    }

    // And it reads back, reading little.
    const src = fileSource(out);
    try {
      const reader = await openImage(format, src, DEFAULT_LIMITS);
      const raw = file(`written-1t.${qemuFormat}.raw`);
      const { extents } = await extentsToRaw(reader, raw);
      fs.rmSync(raw);
      expect(extents).toEqual(merged(DATA.map((d) => [d.offset, d.data.length])));
      expect(src.bytesRead).toBeLessThan(bound);
    } finally {
      src.close();
    }
    fs.rmSync(out);
  });

  test("RAW: a file of 1 TiB that stores only its blocks", async () => {
    expect(fs.statSync(reference).size).toBe(TiB);
    expect(allocatedBytes(reference)).toBeLessThan(2 * MiB);
    const src = withDataRanges(
      fileSource(reference),
      DATA.map((d) => ({ offset: d.offset, length: d.data.length })),
    );
    try {
      const reader = await openImage("RAW", src, DEFAULT_LIMITS);
      for await (const e of reader.extents()) {
        const d = DATA.find((x) => x.offset === e.offset)!;
        expect(e.data.equals(d.data)).toBe(true);
      }
    } finally {
      src.close();
    }
  });
});

describe("writers: files above 2^32 bytes, data written beyond 2^31 and 2^32 in them", () => {
  const B = 64 * KiB;
  const zero = Buffer.alloc(B);

  /**
   * A disk whose every listed block is allocated, most of them zeros (holes in the
   * file), the others data: the written file is as large as the allocation, but
   * costs only the data.
   */
  function allocatedSource(size: number, indexes: number[], data: Map<number, Buffer>): WriteSource {
    return {
      virtualSize: size,
      async *allocated() {
        yield* indexes;
      },
      async *blocks() {
        for (const index of indexes) yield { index, data: data.get(index) ?? zero };
      },
    };
  }

  test.each([
    // qcow2: one cluster per block, in order after the metadata; the ranks of the blocks put them about there in the file.
    ["QCOW2", "qcow2", 70_000, (k: number) => k, [0, TWO31 / B - 2, TWO31 / B + 1, TWO32 / B - 2, TWO32 / B + 1, 69_999]],
    // VHD: one 64 KiB block in each 2 MiB block, whose bitmap and data take 2 MiB + 512 bytes of the file.
    ["VHD", "vpc", 2_100, (k: number) => 32 * k + (k % 32), [0, 1_022, 1_024, 2_046, 2_048, 2_099]],
  ] as const)("%s", async (format, qemuFormat, count, place, chosen) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const indexes = Array.from({ length: count }, (_, k) => place(k));
    const size = (indexes[count - 1] + 1) * B + 4096;
    const data = new Map(chosen.map((k, n) => [place(k), pattern(B, 40 + n)]));
    const source = allocatedSource(size, indexes, data);
    const out = file(`allocated.${qemuFormat}`);
    const reference = file(`allocated.${qemuFormat}.raw`);
    expect(await writeFile(out, WRITERS[format](source), { maxBytes: 16 * MiB })).toBeGreaterThan(TWO32);
    await writeFile(reference, WRITERS.RAW(source), { maxBytes: 16 * MiB });
    if (qemuFormat !== "vpc") expectCleanCheck(out, qemuFormat);
    // Where the chosen blocks went in the file.
    const map = JSON.parse(qemu(["map", "--output=json", "-f", qemuFormat, out])) as Array<{ start: number; offset?: number }>;
    const hosts = [...data.keys()].map((index) => {
      const m = map.filter((x) => x.start <= index * B).pop()!;
      return m.offset! + (index * B - m.start);
    });
    beyond(hosts);
    // qemu-img reads the chosen blocks as the raw export has them (comparing the 4 GiB of zeros too takes the vpc driver long).
    for (const index of data.keys()) compareWindow(out, qemuFormat, reference, index * B, B);
    if (format === "QCOW2") expect(qemu(["compare", "-f", qemuFormat, "-F", "raw", out, reference])).toMatch(/Images are identical/);

    const { bytesRead } = await readBig(out, format, qemuFormat, { dataRanges: true, data: [...data].map(([index, d]) => ({ offset: index * B, data: d })), check: "windows" });
    expect(bytesRead).toBeLessThan(16 * MiB);
    fs.rmSync(out);
    fs.rmSync(reference);
  });
});

describe("the largest disks VHD and VMDK hold", () => {
  const B = 64 * KiB;

  test("VHD: 2040 GiB is written and read; a larger disk is refused with a FormatError both ways", async () => {
    const max = 2040 * GiB;
    const out = file("max.vhd");
    const last = pattern(B, 31);
    await writeFile(out, WRITERS.VHD(blocksSource(max, new Map([[max / B - 1, last]]))), { maxBytes: 8 * MiB });
    const src = fileSource(out);
    try {
      const reader = await openImage("VHD", src, DEFAULT_LIMITS);
      expect(reader.virtualSize).toBe(max);
      const extents: Array<[number, boolean]> = [];
      for await (const e of reader.extents()) extents.push([e.offset, e.data.equals(last)]);
      expect(extents).toEqual([[max - B, true]]);
    } finally {
      src.close();
    }
    await expect(writeFile(file("over.vhd"), WRITERS.VHD(blocksSource(max + 512, new Map())))).rejects.toThrow(/more than a VHD can hold \(2040 GiB\)/);

    // A fixed and a dynamic VHD of 2040 GiB + 512 bytes, which QEMU refuses too.
    fixedVhdFile(file("over-fixed.vhd"), max + 512, []);
    vhdFile(file("over-dynamic.vhd"), { size: max + 512, blocks: [] });
    for (const name of ["over-fixed.vhd", "over-dynamic.vhd"]) {
      const over = fileSource(file(name));
      try {
        await expect(openImage("VHD", over, DEFAULT_LIMITS)).rejects.toThrow(
          new FormatError(`the VHD describes a ${max + 512}-byte disk, more than a VHD can hold (2040 GiB, the limit of Hyper-V and QEMU)`),
        );
      } finally {
        over.close();
      }
      if (qemuImg()) expect(() => qemu(["info", "-f", "vpc", file(name)])).toThrow(/File too large/);
    }
    if (qemuImg()) expect(JSON.parse(qemu(["info", "--output=json", "-f", "vpc", out]))["virtual-size"]).toBe(max);
  });

  test("VMDK: 2 TiB is written and read; a larger disk is refused with a FormatError both ways", async () => {
    const max = 2 * 1024 * GiB;
    const out = file("max.vmdk");
    const last = pattern(B, 32);
    await writeFile(out, WRITERS.VMDK(blocksSource(max, new Map([[max / B - 1, last]]))), { maxBytes: 2 * MiB });
    const src = fileSource(out);
    try {
      const reader = await openImage("VMDK", src, DEFAULT_LIMITS);
      expect(reader.virtualSize).toBe(max);
      const extents: Array<[number, boolean]> = [];
      for await (const e of reader.extents()) extents.push([e.offset, e.data.equals(last)]);
      expect(extents).toEqual([[max - B, true]]);
    } finally {
      src.close();
    }
    if (qemuImg()) {
      expectCleanCheck(out, "vmdk");
      expect(JSON.parse(qemu(["info", "--output=json", "-f", "vmdk", out]))["virtual-size"]).toBe(max);
    }
    await expect(writeFile(file("over.vmdk"), WRITERS.VMDK(blocksSource(max + 512, new Map())))).rejects.toThrow(/more than a sparse VMDK can hold \(2 TiB\)/);

    // One sector more: built by hand, and (when qemu-img is here) a 3 TiB VMDK qemu-img makes.
    vmdkFile(file("over.vmdk"), { size: max + 512, grains: [] });
    const over = [file("over.vmdk")];
    if (qemuImg()) {
      qemu(["create", "-q", "-f", "vmdk", file("3t.vmdk"), "3T"]);
      over.push(file("3t.vmdk"));
    }
    for (const name of over) {
      const o = fileSource(name);
      try {
        await expect(openImage("VMDK", o, DEFAULT_LIMITS)).rejects.toThrow(/more than a sparse VMDK holds \(2 TiB\); convert it to qcow2 or raw first/);
      } finally {
        o.close();
      }
    }
  });
});
