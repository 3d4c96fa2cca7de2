import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { openQcow2, writeQcow2 } from "../../../src/formats/qcow2";
import { BLOCK_SIZE, DEFAULT_LIMITS, FormatError, materialize, type FormatLimits, type RandomAccessSource, type WriteSource, type WriterPiece } from "../../../src/formats/types";
import { allocatedBytes, bufferSource, fileSource, memorySource, prng, qemu, qemuImg, readAll, sampleDisk, tmpDir, writeFile } from "../../helpers/formats";

const MiB = 1024 * 1024;
let tmp: { dir: string; cleanup(): void };
let rawFile: string;
let disk: Buffer;

beforeAll(() => {
  tmp = tmpDir("stowage-qcow2-");
  disk = sampleDisk();
  rawFile = path.join(tmp.dir, "disk.raw");
  fs.writeFileSync(rawFile, disk);
});
afterAll(() => tmp.cleanup());

const file = (name: string) => path.join(tmp.dir, name);

/** qemu-io (from the same qemu-utils package as qemu-img). */
const qemuIo = (args: string[]) => execFileSync("/usr/bin/qemu-io", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });

async function readFile(name: string, limits: FormatLimits = DEFAULT_LIMITS) {
  const src = fileSource(name);
  try {
    const reader = await openQcow2(src, limits);
    return { reader, data: await readAll(reader) };
  } finally {
    src.close();
  }
}

/** Opens and reads the whole image; returns the FormatError it must fail with. */
async function rejection(src: RandomAccessSource, limits: FormatLimits = DEFAULT_LIMITS): Promise<FormatError> {
  try {
    const reader = await openQcow2(src, limits);
    for await (const e of reader.extents()) void e;
  } catch (e) {
    expect(e).toBeInstanceOf(FormatError);
    return e as FormatError;
  }
  throw new Error("the image was accepted");
}

/** qemu-img check --output=json: exit 0, no corruptions, no leaks. */
function expectCleanCheck(name: string) {
  const out = JSON.parse(qemu(["check", "--output=json", name])) as Record<string, unknown>;
  expect(out["check-errors"] ?? 0).toBe(0);
  expect(out["corruptions"] ?? 0).toBe(0);
  expect(out["leaks"] ?? 0).toBe(0);
  expect(out["corruptions-fixed"] ?? 0).toBe(0);
  return out;
}

describe("openQcow2 reads what qemu-img writes", () => {
  const cases: Array<[string, string[], string, boolean]> = [
    ["v2 (compat=0.10)", ["-o", "compat=0.10"], "v2", false],
    ["v3 (default)", [], "v3", false],
    ["v2 zlib-compressed", ["-c", "-o", "compat=0.10"], "v2", true],
    ["v3 zlib-compressed", ["-c"], "v3", true],
    ["v3 zstd-compressed", ["-c", "-o", "compression_type=zstd"], "v3", true],
    ["4 KiB clusters", ["-o", "cluster_size=4096"], "v3", false],
    ["512-byte clusters, compressed", ["-c", "-o", "cluster_size=512"], "v3", true],
    ["2 MiB clusters", ["-o", "cluster_size=2M"], "v3", false],
    ["2 MiB clusters, zstd-compressed", ["-c", "-o", "cluster_size=2M,compression_type=zstd"], "v3", true],
    ["extended L2 entries", ["-o", "extended_l2=on"], "v3", false],
    ["extended L2 entries, 32 KiB clusters, compressed", ["-c", "-o", "extended_l2=on,cluster_size=32k"], "v3", true],
  ];
  test.each(cases)("%s", async (name, options, variant, compressed) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const out = file(`${name.replace(/\W+/g, "_")}.qcow2`);
    qemu(["convert", "-f", "raw", "-O", "qcow2", ...options, rawFile, out]);
    if (compressed) expect(qemu(["check", out])).not.toMatch(/ 0\.00% compressed clusters/);
    const { reader, data } = await readFile(out);
    expect(reader.format).toBe("QCOW2");
    expect(reader.variant).toBe(variant);
    expect(reader.virtualSize).toBe(disk.length);
    expect(data.equals(disk)).toBe(true);
  });

  test("zero clusters (plain and preallocated) and zero subclusters read as zeros", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    for (const options of [[], ["-o", "extended_l2=on"]]) {
      const out = file(`zeros${options.length}.qcow2`);
      qemu(["create", "-f", "qcow2", ...options, out, "4M"]);
      qemuIo(["-c", "write -P 0x55 0 2M", "-c", "write -z 0 1M", "-c", "write -z -u 1M 64k", "-c", "write -P 0x66 3M 2k", "-c", "write -z 100k 6k", out]);
      const expected = Buffer.alloc(4 * MiB);
      expected.fill(0x55, 0, 2 * MiB);
      expected.fill(0, 0, MiB + 64 * 1024);
      expected.fill(0x66, 3 * MiB, 3 * MiB + 2048);
      expected.fill(0, 100 * 1024, 106 * 1024);
      const { data } = await readFile(out);
      expect(data.equals(expected)).toBe(true);
    }
  });

  test("a large sparse image: extents far apart, only its metadata and data are read", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const out = file("sparse64g.qcow2");
    qemu(["create", "-f", "qcow2", out, "64G"]);
    qemuIo(["-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 20G 128k", "-c", `write -P 0x33 ${64 * 1024 * MiB - 4096} 4k`, out]);
    const src = fileSource(out);
    const reader = await openQcow2(src, DEFAULT_LIMITS);
    const extents: Array<[number, number, number, number]> = [];
    for await (const e of reader.extents()) extents.push([e.offset, e.data.length, e.data[0], e.data[e.data.length - 1]]);
    src.close();
    expect(reader.virtualSize).toBe(64 * 1024 * MiB);
    // qemu-io's 4 KiB write at the end allocated (and zero-filled) the whole last cluster.
    expect(extents).toEqual([
      [0, 65536, 0x11, 0x11],
      [20 * 1024 * MiB, 131072, 0x22, 0x22],
      [64 * 1024 * MiB - 65536, 65536, 0, 0x33],
    ]);
    expect(src.bytesRead).toBeLessThan(src.size + 65536);
  });

  test("an image with an internal snapshot reads its active state", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const out = file("snap.qcow2");
    qemu(["convert", "-f", "raw", "-O", "qcow2", rawFile, out]);
    qemu(["snapshot", "-c", "before", out]);
    qemuIo(["-c", "write -P 0x77 0 64k", out]);
    const expected = Buffer.from(disk);
    expected.fill(0x77, 0, 64 * 1024);
    expect((await readFile(out)).data.equals(expected)).toBe(true);
  });
});

describe("writeQcow2", () => {
  async function exportDisk(name: string, source: WriteSource) {
    const out = file(name);
    const size = await writeFile(out, writeQcow2(source));
    expect(size % BLOCK_SIZE).toBe(0);
    return out;
  }

  test("round-trips through openQcow2", async () => {
    const out = await exportDisk("rt.qcow2", memorySource(disk));
    const { reader, data } = await readFile(out);
    expect(reader.variant).toBe("v3");
    expect(data.equals(disk)).toBe(true);
  });

  test("lends its extents: the data of every read lands in one reused buffer", async () => {
    const out = await exportDisk("lent.qcow2", memorySource(disk));
    const src = fileSource(out);
    try {
      const reader = await openQcow2(src, DEFAULT_LIMITS);
      const memory = new Set<ArrayBufferLike>();
      let extents = 0;
      for await (const e of reader.extents()) {
        memory.add(e.data.buffer);
        extents++;
      }
      expect(extents).toBeGreaterThan(2);
      expect(memory.size).toBe(1);
    } finally {
      src.close();
    }
  });

  const shapes: Array<[string, () => Buffer]> = [
    ["the sample disk", () => disk],
    ["an empty (all-zero) disk", () => Buffer.alloc(4 * MiB)],
    ["a 0-byte disk", () => Buffer.alloc(0)],
    ["a disk of 1 MiB + 512 bytes", () => sampleDisk(6 * MiB, 2).subarray(0, MiB + 512)],
    ["a disk whose size is not a multiple of 512", () => sampleDisk(6 * MiB, 3).subarray(0, 3 * MiB + 1000)],
  ];
  test.each(shapes)("qemu-img checks and compares %s", async (name, make) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const content = make();
    const raw = file(`${name.replace(/\W+/g, "_")}.raw`);
    fs.writeFileSync(raw, content);
    const out = await exportDisk(`${name.replace(/\W+/g, "_")}.qcow2`, memorySource(content));
    expectCleanCheck(out);
    // Sizes are rounded up to whole 512-byte sectors, as qemu-img does (QEMU would drop a partial sector).
    const padded = Buffer.alloc(Math.ceil(content.length / 512) * 512);
    content.copy(padded);
    if (padded.length !== content.length) fs.writeFileSync(raw, padded);
    const info = JSON.parse(qemu(["info", "--output=json", out])) as Record<string, unknown>;
    expect(info["virtual-size"]).toBe(padded.length);
    expect(qemu(["compare", "-f", "raw", "-F", "qcow2", raw, out])).toMatch(/Images are identical/);
    const { reader, data } = await readFile(out);
    expect(reader.virtualSize).toBe(padded.length);
    expect(data.equals(padded)).toBe(true);
  });

  /** A sparse disk of `size` bytes with the given blocks allocated, each filled by `fill`. */
  function sparseSource(size: number, indexes: number[] | (() => Iterable<number>), fill: (i: number) => Buffer): WriteSource {
    const list = () => (typeof indexes === "function" ? indexes() : indexes);
    return {
      virtualSize: size,
      async *allocated() {
        yield* list();
      },
      async *blocks() {
        for (const index of list()) yield { index, data: fill(index) };
      },
    };
  }
  const marked = (i: number) => {
    const b = Buffer.alloc(BLOCK_SIZE);
    b.write(`block ${i}`, 0);
    b.writeUInt32BE(i, BLOCK_SIZE - 4);
    return b;
  };

  test("a sparse disk spanning several L2 tables", async () => {
    const size = 3 * 512 * MiB + 4096 + 17;
    const blocks = Math.ceil(size / BLOCK_SIZE);
    const indexes = [0, 1, 8191, 8192, 8200, 2 * 8192 + 5, blocks - 1];
    const out = await exportDisk("sparse.qcow2", sparseSource(size, indexes, marked));
    const got = new Map<number, Buffer>();
    const src = fileSource(out);
    const reader = await openQcow2(src, DEFAULT_LIMITS);
    for await (const e of reader.extents()) {
      for (let o = 0; o < e.data.length; o += BLOCK_SIZE) got.set((e.offset + o) / BLOCK_SIZE, Buffer.from(e.data.subarray(o, o + BLOCK_SIZE))); // extents are lent: keep a copy
    }
    src.close();
    expect([...got.keys()]).toEqual(indexes);
    for (const i of indexes.slice(0, -1)) expect(got.get(i)!.equals(marked(i))).toBe(true);
    // The size is rounded up to a whole sector; the bytes past the disk's end are zeros.
    expect(reader.virtualSize).toBe(3 * 512 * MiB + 4096 + 512);
    const last = Buffer.alloc(512 + 4096);
    marked(blocks - 1).copy(last, 0, 0, size % BLOCK_SIZE);
    expect(got.get(blocks - 1)!.equals(last)).toBe(true);

    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    expectCleanCheck(out);
    const map = JSON.parse(qemu(["map", "--output=json", out])) as Array<{ start: number; length: number; data: boolean }>;
    const dataBlocks = map.filter((m) => m.data).flatMap((m) => Array.from({ length: Math.ceil(m.length / BLOCK_SIZE) }, (_, k) => m.start / BLOCK_SIZE + k));
    expect(dataBlocks).toEqual(indexes);
  });

  test("a file big enough for two refcount blocks has exact refcounts", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    // 33000 data clusters: with the metadata, more than the 32768 clusters one refcount block covers.
    const count = 33000;
    const zero = Buffer.alloc(BLOCK_SIZE);
    const source = sparseSource(
      8 * 1024 * MiB,
      () => Array.from({ length: count }, (_, k) => k * 2),
      (i) => (i % 1000 === 0 ? marked(i) : zero),
    );
    // Clusters of zeros are holes, so the 2 GiB file costs little.
    const out = file("big.qcow2");
    const pos = await writeFile(out, writeQcow2(source), { maxBytes: 16 * MiB });
    expect(pos).toBeGreaterThan(32768 * BLOCK_SIZE);
    expect(allocatedBytes(out)).toBeLessThan(16 * MiB);
    const result = expectCleanCheck(out);
    expect(result["allocated-clusters"]).toBe(count);
  });

  test("refuses a source whose blocks change between passes", async () => {
    let calls = 0;
    const source: WriteSource = {
      virtualSize: 4 * MiB,
      async *allocated() {
        yield* calls++ === 0 ? [1, 2] : [1, 3];
      },
      async *blocks() {
        yield { index: 1, data: marked(1) };
      },
    };
    await expect(writeFile(file("changed.qcow2"), writeQcow2(source))).rejects.toThrow(/changed between the passes/);
  });
});

describe("openQcow2 refuses", () => {
  let image: Buffer;
  beforeAll(async () => {
    image = Buffer.concat(await collect(writeQcow2(memorySource(disk))));
  });
  const patched = (edit: (b: Buffer) => void) => {
    const b = Buffer.from(image);
    edit(b);
    return bufferSource(b);
  };

  test("a backing file", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const overlay = file("overlay.qcow2");
    qemu(["create", "-f", "qcow2", "-b", rawFile, "-F", "raw", overlay]);
    const src = fileSource(overlay);
    const e = await rejection(src);
    src.close();
    expect(e.message).toMatch(/has a backing file "[^"]*disk\.raw"/);
    expect(e.message).toMatch(/import a standalone image \(qemu-img convert/);
  });

  test("encryption", async () => {
    const aes = await rejection(patched((b) => b.writeUInt32BE(1, 32)));
    expect(aes.message).toMatch(/encrypted \(AES\)/);
    const luks = await rejection(patched((b) => b.writeUInt32BE(2, 32)));
    expect(luks.message).toMatch(/encrypted \(LUKS\)/);
  });

  test("a real LUKS-encrypted image", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const out = file("luks.qcow2");
    // qemu-img times its key derivation on the CPU clock and, on a busy machine, may read no
    // time passing ("Unable to get accurate CPU usage"): only that is tried again.
    for (let attempt = 1; ; attempt++) {
      try {
        qemu(["create", "--object", "secret,id=sec0,data=hunter2", "-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", out, "4M"]);
        break;
      } catch (err) {
        if (attempt === 5 || !/Unable to get accurate CPU usage/.test(String((err as { stderr?: string }).stderr))) throw err;
      }
    }
    const src = fileSource(out);
    const e = await rejection(src);
    src.close();
    expect(e.message).toMatch(/encrypted \(LUKS\)/);
  });

  test("a virtual size beyond the limits", async () => {
    const e = await rejection(bufferSource(image), { maxVirtualSize: 4 * MiB, maxMetadataBytes: MiB });
    expect(e.message).toMatch(/describes a 8388608-byte disk, more than the largest allowed disk \(4194304 bytes\)/);
    const huge = await rejection(patched((b) => b.writeBigUInt64BE(0xffffffffffffffffn, 24)));
    expect(huge.message).toMatch(/more than the largest allowed disk/);
  });

  test("more metadata than the limits allow", async () => {
    const e = await rejection(bufferSource(image), { maxVirtualSize: 64 * MiB, maxMetadataBytes: 32 * 1024 });
    expect(e.message).toMatch(/L2 tables .* more metadata than allowed \(32768 bytes\)/);
  });

  test("a truncated file", async () => {
    const half = await rejection(bufferSource(image.subarray(0, image.length - BLOCK_SIZE)));
    expect(half.message).toMatch(/data cluster for guest offset \d+ at offset \d+ \(65536 bytes\) lies outside the \d+-byte file/);
    const header = await rejection(bufferSource(image.subarray(0, 50)));
    expect(header.message).toMatch(/too small to be a qcow2 image \(50 bytes\)/);
    const tables = await rejection(bufferSource(image.subarray(0, 3 * BLOCK_SIZE)));
    expect(tables.message).toMatch(/lies outside the 196608-byte file/);
  });

  test("an L1 table past the end of the file", async () => {
    const e = await rejection(patched((b) => b.writeBigUInt64BE(BigInt(1000 * BLOCK_SIZE), 40)));
    expect(e.message).toMatch(/the qcow2 L1 table at offset 65536000 \(8 bytes\) lies outside the \d+-byte file/);
    const unaligned = await rejection(patched((b) => b.writeBigUInt64BE(BigInt(BLOCK_SIZE + 8), 40)));
    expect(unaligned.message).toMatch(/L1 table offset 65544 is not aligned/);
  });

  test("an absurd l1_size", async () => {
    const e = await rejection(patched((b) => b.writeUInt32BE(0xffffffff, 36)));
    expect(e.message).toMatch(/L1 table has 4294967295 entries .* more metadata than allowed/);
    const small = await rejection(patched((b) => b.writeUInt32BE(0, 36)));
    expect(small.message).toMatch(/L1 table has 0 entries, too few for a 8388608-byte disk/);
  });

  test("bad magic, versions, cluster sizes and header lengths", async () => {
    expect((await rejection(patched((b) => b.write("QFI\xfa", 0, "latin1")))).message).toMatch(/not a qcow2 image/);
    expect((await rejection(patched((b) => b.writeUInt32BE(4, 4)))).message).toMatch(/version 4 is not supported/);
    expect((await rejection(patched((b) => b.writeUInt32BE(22, 20)))).message).toMatch(/cluster_bits is 22/);
    expect((await rejection(patched((b) => b.writeUInt32BE(8, 20)))).message).toMatch(/cluster_bits is 8/);
    expect((await rejection(patched((b) => b.writeUInt32BE(100, 100)))).message).toMatch(/header_length is 100/);
  });

  test("unknown incompatible features, external data files, corrupt images, unknown compression", async () => {
    expect((await rejection(patched((b) => b.writeBigUInt64BE(1n << 5n, 72)))).message).toMatch(/incompatible features .* \(bit 5\)/);
    expect((await rejection(patched((b) => b.writeBigUInt64BE(1n << 2n, 72)))).message).toMatch(/external data file/);
    expect((await rejection(patched((b) => b.writeBigUInt64BE(1n << 1n, 72)))).message).toMatch(/marked corrupt/);
    expect((await rejection(patched((b) => b.writeUInt8(2, 104)))).message).toMatch(/compression type 2/);
    expect((await rejection(patched((b) => b.writeUInt8(1, 104)))).message).toMatch(/does not agree with the compression type feature bit/);
  });

  test("names unknown features from the feature name table", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const out = file("features.qcow2");
    qemu(["create", "-f", "qcow2", out, "4M"]);
    const b = fs.readFileSync(out);
    b.writeBigUInt64BE(1n << 5n, 72);
    // Rename the "dirty bit" entry of the feature name table to bit 5.
    const at = b.indexOf("dirty bit");
    b.writeUInt8(5, at - 1);
    b.write("future thing\0", at, "latin1");
    expect((await rejection(bufferSource(b))).message).toMatch(/bit 5 "future thing"/);
  });

  test("a dirty image is read (its refcounts are not used)", async () => {
    const b = Buffer.from(image);
    b.writeBigUInt64BE(1n, 72);
    expect((await readAll(await openQcow2(bufferSource(b), DEFAULT_LIMITS))).equals(disk)).toBe(true);
  });

  test("L1 and L2 entries that point out of the file, unaligned or at metadata", async () => {
    const l1 = image.readUInt32BE(44); // low half of l1_table_offset
    const l2 = Number(image.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const firstData = Number(image.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
    const cases: Array<[(b: Buffer) => void, RegExp]> = [
      [(b) => b.writeBigUInt64BE((1n << 63n) | BigInt(image.length), l1), /L2 table of L1 entry 0 at offset \d+ \(65536 bytes\) lies outside/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | BigInt(l2 + 512), l1), /L2 table of L1 entry 0 \(offset \d+\) is not aligned/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | BigInt(l1), l1), /L2 table of L1 entry 0 \(offset \d+\) overlaps the L1 table/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | 1n | BigInt(l2), l1), /L1 entry 0 has reserved bits set/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | BigInt(image.length), l2), /data cluster for guest offset 0 at offset \d+ \(65536 bytes\) lies outside/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | BigInt(firstData + 4096), l2), /data cluster offset \d+ is not aligned/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | BigInt(l2), l2), /data cluster at offset \d+ overlaps an L2 table/],
      [(b) => b.writeBigUInt64BE((1n << 63n) | 2n | BigInt(firstData), l2), /guest offset 0 has reserved bits set/],
    ];
    for (const [edit, message] of cases) {
      expect((await rejection(patched(edit))).message).toMatch(message);
    }
    // The zero flag turns a cluster into zeros, whatever its offset.
    const zeroed = patched((b) => b.writeBigUInt64BE((1n << 63n) | 1n | BigInt(firstData), l2));
    const expected = Buffer.from(disk);
    expected.fill(0, 0, BLOCK_SIZE);
    expect((await readAll(await openQcow2(zeroed, DEFAULT_LIMITS))).equals(expected)).toBe(true);
  });

  test("compressed clusters that do not decompress to a full cluster", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    for (const type of ["zlib", "zstd"]) {
      const out = file(`damaged-${type}.qcow2`);
      qemu(["convert", "-f", "raw", "-O", "qcow2", "-c", "-o", `compression_type=${type}`, rawFile, out]);
      const b = fs.readFileSync(out);
      // The cluster at 5 MiB (4 KiB of random bytes, then zeros) compresses to several sectors.
      const l1 = Number(b.readBigUInt64BE(40));
      const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
      const entry = b.readBigUInt64BE(l2 + 80 * 8);
      expect(entry >> 62n).toBe(1n); // compressed
      const host = Number(entry & ((1n << 54n) - 1n));
      const garbled = Buffer.from(b);
      garbled.fill(0xff, host, host + 16);
      expect((await rejection(bufferSource(garbled))).message).toMatch(new RegExp(`compressed cluster for guest offset ${5 * MiB} does not (inflate|decompress)`));
      // One sector of a multi-sector stream: too short for a cluster.
      const short = Buffer.from(b);
      short.writeBigUInt64BE((1n << 62n) | BigInt(host), l2 + 80 * 8);
      expect((await rejection(bufferSource(short))).message).toMatch(/instead of a full cluster/);
    }
  });
});

async function collect(pieces: AsyncIterable<WriterPiece>) {
  const out: Buffer[] = [];
  for await (const c of materialize(pieces)) out.push(Buffer.from(c));
  return out;
}

describe("fuzzing", () => {
  test("mutated images are read or refused with a FormatError, within the limits", async () => {
    const small = sampleDisk(8 * MiB, 7);
    const seeds: Buffer[] = [Buffer.concat(await collect(writeQcow2(memorySource(small))))];
    if (qemuImg()) {
      const raw = file("fuzz.raw");
      fs.writeFileSync(raw, small);
      const variants = [["-o", "compat=0.10"], ["-c"], ["-c", "-o", "compression_type=zstd"], ["-o", "cluster_size=4096"], ["-o", "extended_l2=on,cluster_size=16k"], ["-c", "-o", "cluster_size=512"]];
      variants.forEach((options, k) => {
        const out = file(`fuzz${k}.qcow2`);
        qemu(["convert", "-f", "raw", "-O", "qcow2", ...options, raw, out]);
        seeds.push(fs.readFileSync(out));
      });
    } else expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");

    const limits: FormatLimits = { maxVirtualSize: 64 * MiB, maxMetadataBytes: MiB };
    const rnd = prng(20240611);
    const int = (n: number) => Math.floor(rnd() * n);
    const interesting = [0, 1, 0x7f, 0x80, 0xff, 0x200, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff];
    const fields = [4, 8, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 72, 76, 80, 96, 100, 104];

    /** The offsets of the seed's L1 table and of its L2 tables and data. */
    function tables(b: Buffer) {
      const clusterBits = b.readUInt32BE(20);
      const l1 = Number(b.readBigUInt64BE(40));
      const l1Size = b.readUInt32BE(36);
      const extended = b.readUInt32BE(4) === 3 && (b.readBigUInt64BE(72) & 16n) !== 0n;
      const l2s: number[] = [];
      const data: number[] = [];
      for (let i = 0; i < l1Size; i++) {
        const off = Number(b.readBigUInt64BE(l1 + i * 8) & 0x00fffffffffffe00n);
        if (!off) continue;
        l2s.push(off);
        for (let j = 0; j < 2 ** clusterBits; j += extended ? 16 : 8) {
          const e = b.readBigUInt64BE(off + j);
          if (e >> 62n === 1n) data.push(Number(e & ((1n << BigInt(70 - clusterBits)) - 1n)));
          else if (e & 0x00fffffffffffe00n) data.push(Number(e & 0x00fffffffffffe00n));
        }
      }
      return { clusterSize: 2 ** clusterBits, l1, l1Size, l2s, data, extended };
    }
    const layouts = seeds.map(tables);

    const failures: string[] = [];
    let accepted = 0;
    let refused = 0;
    const ITERATIONS = 400;
    for (let it = 0; it < ITERATIONS; it++) {
      const k = int(seeds.length);
      const b = Buffer.from(seeds[k]);
      const t = layouts[k];
      const mutations = 1 + int(4);
      for (let m = 0; m < mutations; m++) {
        const what = int(7);
        if (what === 0) b[int(512)] = int(256);
        else if (what === 1) b[int(512)] ^= 1 << int(8);
        else if (what === 2) b.writeUInt32BE(interesting[int(interesting.length)] >>> 0, fields[int(fields.length)]);
        else if (what === 3 && t.l1Size > 0) b[t.l1 + int(t.l1Size * 8)] = int(256);
        else if (what === 4 && t.l2s.length) {
          const l2 = t.l2s[int(t.l2s.length)];
          const pos = l2 + int(t.clusterSize / 8) * 8;
          if (rnd() < 0.5) b[pos + int(8)] = int(256);
          else {
            const choices = [
              0n,
              1n,
              1n << 62n,
              1n << 63n,
              BigInt(b.length),
              BigInt(t.l1),
              BigInt(l2),
              (1n << 62n) | BigInt(int(b.length)),
              BigInt(int(b.length)) & ~511n,
              0x00fffffffffffe00n,
              0xffffffffffffffffn,
            ];
            b.writeBigUInt64BE(choices[int(choices.length)], pos);
          }
        } else if (what === 5 && t.extended && t.l2s.length) {
          const l2 = t.l2s[int(t.l2s.length)];
          b.writeUInt32BE(interesting[int(interesting.length)] >>> 0, l2 + int(t.clusterSize / 16) * 16 + 8 + 4 * int(2));
        } else if (what === 6 && t.data.length) {
          const d = t.data[int(t.data.length)];
          b[Math.min(b.length - 1, d + int(64))] = int(256);
        }
      }

      const src = bufferSource(b);
      let bytesRead = 0;
      const counted: RandomAccessSource = {
        size: src.size,
        read: (offset, length) => {
          bytesRead += length;
          return src.read(offset, length);
        },
      };
      const run = async () => {
        const reader = await openQcow2(counted, limits);
        if (reader.virtualSize > limits.maxVirtualSize) throw new Error(`virtual size ${reader.virtualSize} beyond the limit`);
        let total = 0;
        let last = 0;
        for await (const e of reader.extents()) {
          if (e.data.length > 2 * MiB) throw new Error(`an extent of ${e.data.length} bytes`);
          if (e.offset < last || e.offset + e.data.length > reader.virtualSize) throw new Error(`extent at ${e.offset} out of order or past the disk`);
          last = e.offset + e.data.length;
          total += e.data.length;
        }
        if (total > reader.virtualSize) throw new Error(`${total} bytes yielded for a ${reader.virtualSize}-byte disk`);
        // Reads: the header cluster, the metadata, and at most two clusters per guest cluster.
        if (bytesRead > 2 * MiB + limits.maxMetadataBytes + 2 * reader.virtualSize + 4 * MiB) throw new Error(`read ${bytesRead} bytes`);
      };
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error("timed out")), 20_000); // a hang, not a busy machine
      });
      try {
        await Promise.race([run(), timeout]);
        accepted++;
      } catch (e) {
        if (e instanceof FormatError) refused++;
        else failures.push(`iteration ${it} (seed ${k}): ${(e as Error).stack}`);
      } finally {
        clearTimeout(timer);
      }
    }
    expect(failures).toEqual([]);
    expect(accepted + refused).toBe(ITERATIONS);
    expect(accepted).toBeGreaterThan(ITERATIONS / 10);
    expect(refused).toBeGreaterThan(ITERATIONS / 10);
  }, 120_000);
});
