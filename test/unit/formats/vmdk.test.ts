import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { BLOCK_SIZE, DEFAULT_LIMITS, FormatError, isHole, type FormatLimits, type ImageReader } from "../../../src/formats/types";
import { openVmdk, writeVmdk } from "../../../src/formats/vmdk";
import { bufferSource, fileSource, memorySource, prng, qemu, qemuImg, readAll, sampleDisk, tmpDir, writeFile } from "../../helpers/formats";

const MiB = 1024 * 1024;
const SECTOR = 512;

let tmp: ReturnType<typeof tmpDir>;
beforeEach(() => {
  tmp = tmpDir("stowage-vmdk-");
});
afterEach(() => tmp.cleanup());

const file = (name: string) => path.join(tmp.dir, name);

async function openFile(name: string, limits: FormatLimits = DEFAULT_LIMITS): Promise<ImageReader> {
  const src = fileSource(file(name));
  // The tests' files are small: read them whole so no descriptor stays open.
  const buf = await src.read(0, src.size);
  src.close();
  return openVmdk(bufferSource(buf), limits);
}

async function exportVmdk(disk: Buffer, name: string): Promise<Buffer> {
  await writeFile(file(name), writeVmdk(memorySource(disk)));
  return fs.readFileSync(file(name));
}

/** Opens and reads everything; the FormatError it throws, or fails. */
async function refusal(buf: Buffer, limits: FormatLimits = DEFAULT_LIMITS): Promise<FormatError> {
  try {
    const reader = await openVmdk(bufferSource(buf), limits);
    await readAll(reader);
  } catch (err) {
    if (err instanceof FormatError) return err;
    throw err;
  }
  throw new Error("the file was accepted");
}

// ---------------------------------------------------------------- a monolithicSparse builder

interface SparseOptions {
  grainSectors?: number;
  /** Grains written as the zeroed-grain GTE (1), which needs version 2. */
  zeroGrains?: number[];
  descriptor?: string;
}

const descriptorFor = (sectors: number, extra = "") =>
  `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicSparse"\n${extra}\n# Extent description\nRW ${sectors} SPARSE "disk.vmdk"\n\n#DDB\nddb.adapterType = "ide"\n`;

/** A hosted sparse extent as VMware lays it out: header, descriptor, grain directory, grain tables, grains. */
function buildSparse(disk: Buffer, opts: SparseOptions = {}): Buffer {
  const g = opts.grainSectors ?? 128;
  const grainBytes = g * SECTOR;
  const capacity = Math.ceil(disk.length / SECTOR);
  const grains = Math.ceil(capacity / g);
  const tables = Math.ceil(grains / 512);
  const descriptor = Buffer.alloc(20 * SECTOR);
  descriptor.write(opts.descriptor ?? descriptorFor(capacity));
  const gdSectors = Math.ceil((tables * 4) / SECTOR);
  const gd = Buffer.alloc(gdSectors * SECTOR);
  const zero = Buffer.alloc(grainBytes);
  const used = (t: number) => {
    for (let i = t * 512; i < Math.min(grains, (t + 1) * 512); i++) {
      if (opts.zeroGrains?.includes(i) || !disk.subarray(i * grainBytes, (i + 1) * grainBytes).equals(zero.subarray(0, Math.min(grainBytes, disk.length - i * grainBytes)))) return true;
    }
    return false;
  };
  let next = 21 + gdSectors;
  const gtAt: number[] = [];
  for (let t = 0; t < tables; t++) {
    if (!used(t)) continue;
    gtAt[t] = next;
    gd.writeUInt32LE(next, t * 4);
    next += 4;
  }
  const gts = Buffer.alloc((next - 21 - gdSectors) * SECTOR);
  const grainParts: Buffer[] = [];
  for (let i = 0; i < grains; i++) {
    const t = Math.floor(i / 512);
    if (gtAt[t] === undefined) continue;
    const gte = (gtAt[t] - 21 - gdSectors) * SECTOR + (i % 512) * 4;
    if (opts.zeroGrains?.includes(i)) {
      gts.writeUInt32LE(1, gte);
      continue;
    }
    const data = Buffer.alloc(grainBytes);
    disk.copy(data, 0, i * grainBytes, Math.min(disk.length, (i + 1) * grainBytes));
    if (data.equals(zero)) continue;
    gts.writeUInt32LE(next, gte);
    grainParts.push(data);
    next += g;
  }
  const header = Buffer.alloc(SECTOR);
  header.write("KDMV", 0, "latin1");
  header.writeUInt32LE(opts.zeroGrains ? 2 : 1, 4);
  header.writeUInt32LE(1 | (opts.zeroGrains ? 4 : 0), 8);
  header.writeBigUInt64LE(BigInt(capacity), 12);
  header.writeBigUInt64LE(BigInt(g), 20);
  header.writeBigUInt64LE(1n, 28);
  header.writeBigUInt64LE(20n, 36);
  header.writeUInt32LE(512, 44);
  header.writeBigUInt64LE(21n, 56);
  header.writeBigUInt64LE(BigInt(21 + gdSectors + gts.length / SECTOR), 64);
  header.write("\n \r\n", 73, "latin1");
  return Buffer.concat([header, descriptor, gd, gts, ...grainParts]);
}

/** A sparse disk: a few blocks of data spread over `size` bytes. */
function sparseDisk(size: number, seed = 7): Buffer {
  const disk = Buffer.alloc(size);
  const rnd = prng(seed);
  const at = [0, 3 * BLOCK_SIZE + 100, Math.floor(size / 2), 33 * MiB + 4096, size - 3000].filter((o) => o >= 0 && o < size);
  for (const off of at) {
    for (let i = 0; i < 2000 && off + i < size; i++) disk[off + i] = rnd() < 0.5 ? Math.floor(rnd() * 256) : 0x41 + (i % 26);
  }
  return disk;
}

/** Where the structures of a valid sparse VMDK lie, for patching and fuzzing. */
function layout(buf: Buffer) {
  let header = buf.subarray(0, SECTOR);
  const gdAtEnd = header.readBigUInt64LE(56) === 0xffffffffffffffffn;
  if (gdAtEnd) header = buf.subarray(buf.length - 1024, buf.length - 512);
  const grainSectors = Number(header.readBigUInt64LE(20));
  const capacity = Number(header.readBigUInt64LE(12));
  const gdOffset = Number(header.readBigUInt64LE(56)) * SECTOR;
  const gdEntries = Math.ceil(Math.ceil(capacity / grainSectors) / 512);
  const gts: number[] = [];
  const grains: number[] = [];
  for (let i = 0; i < gdEntries; i++) {
    const gt = buf.readUInt32LE(gdOffset + i * 4) * SECTOR;
    if (!gt) continue;
    gts.push(gt);
    for (let e = 0; e < 512; e++) {
      const s = buf.readUInt32LE(gt + e * 4);
      if (s > 1) grains.push(s * SECTOR);
    }
  }
  return {
    gdAtEnd,
    headerAt: gdAtEnd ? buf.length - 1024 : 0,
    descriptor: [Number(header.readBigUInt64LE(28)) * SECTOR, Number(header.readBigUInt64LE(36)) * SECTOR] as const,
    gdOffset,
    gdBytes: gdEntries * 4,
    gts,
    grains,
  };
}

// ---------------------------------------------------------------- reading qemu-img's files

describe("openVmdk reads what qemu-img writes", () => {
  const cases: [string, string[], string][] = [
    ["monolithicSparse (qemu's default)", [], "monolithicSparse"],
    ["streamOptimized", ["-o", "subformat=streamOptimized"], "streamOptimized"],
    ["monolithicSparse, compat6", ["-o", "subformat=monolithicSparse", "-o", "compat6"], "monolithicSparse"],
  ];
  it.each(cases)("%s", async (_name, options, variant) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const disk = sampleDisk();
    fs.writeFileSync(file("disk.raw"), disk);
    qemu(["convert", "-f", "raw", "-O", "vmdk", ...options, file("disk.raw"), file("disk.vmdk")]);
    const reader = await openFile("disk.vmdk");
    expect(reader.format).toBe("VMDK");
    expect(reader.variant).toBe(variant);
    expect(reader.virtualSize).toBe(disk.length);
    expect((await readAll(reader)).equals(disk)).toBe(true);
  });

  it("reads zeroed-grain entries (version 2, zeroed_grain=on) as zeros", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    qemu(["create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on", file("z.vmdk"), "4M"]);
    execFileSync("/usr/bin/qemu-io", ["-f", "vmdk", "-c", "write -P 0x55 0 192k", "-c", "write -z 64k 64k", "-c", "write -P 0x66 1M 4k", file("z.vmdk")], { stdio: "ignore" });
    const reader = await openFile("z.vmdk");
    const want = Buffer.alloc(4 * MiB);
    want.fill(0x55, 0, 192 * 1024);
    want.fill(0, 64 * 1024, 128 * 1024);
    want.fill(0x66, MiB, MiB + 4096);
    const got = await readAll(reader);
    expect(got.equals(want)).toBe(true);
    const offsets: number[] = [];
    for await (const e of reader.extents()) offsets.push(e.offset);
    expect(offsets).not.toContain(64 * 1024); // the zeroed grain is not an extent
  });

  it.each([["monolithicFlat"], ["twoGbMaxExtentSparse"], ["twoGbMaxExtentFlat"]])("refuses %s: its descriptor refers to other files", async (subformat) => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    fs.writeFileSync(file("disk.raw"), sampleDisk(2 * MiB));
    qemu(["convert", "-f", "raw", "-O", "vmdk", "-o", `subformat=${subformat}`, file("disk.raw"), file("disk.vmdk")]);
    const err = await refusal(fs.readFileSync(file("disk.vmdk")));
    expect(err.message).toMatch(/refers to other files/);
    expect(err.message).toContain(subformat);
    expect(err.message).toMatch(/qemu-img convert/);
  });

  it("refuses a delta disk qemu-img made on a parent", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    qemu(["create", "-q", "-f", "vmdk", file("base.vmdk"), "4M"]);
    qemu(["create", "-q", "-f", "vmdk", "-b", file("base.vmdk"), "-F", "vmdk", file("child.vmdk")]);
    const err = await refusal(fs.readFileSync(file("child.vmdk")));
    expect(err.message).toMatch(/has a parent disk/);
    expect(err.message).toContain("base.vmdk");
  });
});

// ---------------------------------------------------------------- reading built files

describe("openVmdk on hand-built monolithicSparse files", () => {
  it.each([[1], [8], [128], [2048]])("reads grains of %i sectors", async (grainSectors) => {
    const disk = sparseDisk(3 * MiB + 1536);
    const reader = await openVmdk(bufferSource(buildSparse(disk, { grainSectors })), DEFAULT_LIMITS);
    expect(reader.variant).toBe("monolithicSparse");
    expect(reader.virtualSize).toBe(disk.length);
    expect((await readAll(reader)).equals(disk)).toBe(true);
  });

  it("reads a disk that spans several grain tables, skipping empty ones", async () => {
    const disk = sparseDisk(100 * MiB);
    const reader = await openVmdk(bufferSource(buildSparse(disk)), DEFAULT_LIMITS);
    expect((await readAll(reader)).equals(disk)).toBe(true);
  });

  it("yields zeroed grains (version 2) as nothing", async () => {
    const disk = sparseDisk(2 * MiB);
    const reader = await openVmdk(bufferSource(buildSparse(disk, { zeroGrains: [5, 6] })), DEFAULT_LIMITS);
    const extents: number[] = [];
    for await (const e of reader.extents()) extents.push(e.offset);
    expect(extents.every((o) => o < 5 * BLOCK_SIZE || o >= 7 * BLOCK_SIZE)).toBe(true);
    expect((await readAll(reader)).equals(disk)).toBe(true);
  });

  it("accepts a last compressed grain that inflates only to the end of the disk", async () => {
    const disk = sampleDisk(3 * MiB + 5 * 512);
    const out = Buffer.from(await exportVmdk(disk, "out.vmdk"));
    const last = layout(out).grains.at(-1)!;
    expect(out.readBigUInt64LE(last)).toBe(48n * 128n);
    const tail = disk.subarray(48 * BLOCK_SIZE);
    const packed = zlib.deflateSync(tail);
    out.writeUInt32LE(packed.length, last + 8);
    packed.copy(out, last + 12);
    const reader = await openVmdk(bufferSource(out), DEFAULT_LIMITS);
    expect((await readAll(reader)).equals(disk)).toBe(true);
    const short = zlib.deflateSync(tail.subarray(0, tail.length - 1));
    out.writeUInt32LE(short.length, last + 8);
    short.copy(out, last + 12);
    expect((await refusal(out)).message).toMatch(/compressed grain 48 inflates to 2559 bytes instead of 65536/);
  });

  it("reads a version 1 file without a descriptor as monolithicSparse", async () => {
    const disk = sparseDisk(MiB);
    const buf = buildSparse(disk);
    buf.writeBigUInt64LE(0n, 28);
    buf.writeBigUInt64LE(0n, 36);
    const reader = await openVmdk(bufferSource(buf), DEFAULT_LIMITS);
    expect(reader.variant).toBe("monolithicSparse");
    expect((await readAll(reader)).equals(disk)).toBe(true);
  });
});

// ---------------------------------------------------------------- export

describe("writeVmdk", () => {
  async function roundTrip(disk: Buffer) {
    fs.writeFileSync(file("disk.raw"), disk);
    const out = await exportVmdk(disk, "out.vmdk");
    const reader = await openVmdk(bufferSource(out), DEFAULT_LIMITS);
    expect(reader.variant).toBe("streamOptimized");
    expect(reader.virtualSize).toBe(disk.length);
    expect((await readAll(reader)).equals(disk)).toBe(true);
    return out;
  }

  function qemuAgrees(disk: Buffer) {
    expect(qemu(["check", "-f", "vmdk", file("out.vmdk")])).toMatch(/No errors were found/);
    const info = JSON.parse(qemu(["info", "--output=json", "-f", "vmdk", file("out.vmdk")]));
    expect(info["virtual-size"]).toBe(disk.length);
    expect(info["format-specific"].data["create-type"]).toBe("streamOptimized");
    expect(qemu(["compare", "-f", "vmdk", "-F", "raw", file("out.vmdk"), file("disk.raw")])).toMatch(/Images are identical/);
    qemu(["convert", "-f", "vmdk", "-O", "raw", file("out.vmdk"), file("back.raw")]);
    expect(fs.readFileSync(file("back.raw")).equals(disk)).toBe(true);
  }

  it("writes a streamOptimized file qemu-img checks, compares identical and converts back", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const disk = sampleDisk();
    const out = await roundTrip(disk);
    expect(out.length).toBeLessThan(disk.length); // the text and zero regions compress
    qemuAgrees(disk);
  });

  it("writes an empty disk", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const disk = Buffer.alloc(4 * MiB);
    const out = await roundTrip(disk);
    expect(out.length).toBeLessThan(128 * 1024);
    qemuAgrees(disk);
  });

  it("writes a disk whose size is not a multiple of 64 KiB", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const disk = sampleDisk(3 * MiB + 5 * 512);
    await roundTrip(disk);
    qemuAgrees(disk);
  });

  it("writes a sparse disk spanning several grain tables", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const disk = sparseDisk(100 * MiB + 512);
    const out = await roundTrip(disk);
    expect(out.length).toBeLessThan(MiB);
    qemuAgrees(disk);
  });

  it("lays out the stream as the specification says", async () => {
    const disk = sparseDisk(40 * MiB);
    const out = await exportVmdk(disk, "out.vmdk");
    expect(out.length % SECTOR).toBe(0);
    expect(out.subarray(0, 4).toString("latin1")).toBe("KDMV");
    expect(out.readUInt32LE(4)).toBe(3);
    expect(out.readBigUInt64LE(56)).toBe(0xffffffffffffffffn);
    expect(out.readBigUInt64LE(20)).toBe(128n);
    expect(out.readUInt16LE(77)).toBe(1);
    const text = out.subarray(512, 512 * 21).toString("latin1");
    expect(text).toMatch(/createType="streamOptimized"/);
    expect(text).toMatch(/parentCID=ffffffff/);
    expect(text).toMatch(new RegExp(`RW ${disk.length / 512} SPARSE`));
    expect(text).toMatch(/ddb\.adapterType = "(ide|lsilogic)"/);
    expect(text).toMatch(/ddb\.geometry\.cylinders = "\d+"/);
    // The end: footer marker, footer (header with the real gdOffset), end-of-stream marker.
    const footerMarker = out.subarray(out.length - 1536, out.length - 1024);
    expect(footerMarker.readUInt32LE(12)).toBe(3);
    const footer = out.subarray(out.length - 1024, out.length - 512);
    const gdOffset = Number(footer.readBigUInt64LE(56));
    expect(out.subarray(out.length - 512).equals(Buffer.alloc(512))).toBe(true);
    const gdMarker = out.subarray((gdOffset - 1) * 512, gdOffset * 512);
    expect(gdMarker.readUInt32LE(12)).toBe(2);
    // 40 MiB: two grain tables, both with grains; each behind a GT marker.
    for (let t = 0; t < 2; t++) {
      const gt = out.readUInt32LE(gdOffset * 512 + t * 4);
      expect(gt).toBeGreaterThan(0);
      expect(out.readUInt32LE((gt - 1) * 512 + 12)).toBe(1);
      expect(out.readBigUInt64LE((gt - 1) * 512)).toBe(4n);
    }
    // The first grain: marker with its LBA and size, deflated data.
    const first = out.subarray(128 * 512);
    expect(first.readBigUInt64LE(0)).toBe(0n);
    const inflated = zlib.inflateSync(first.subarray(12, 12 + first.readUInt32LE(8)));
    expect(inflated.equals(disk.subarray(0, BLOCK_SIZE))).toBe(true);
    // Between the descriptor and the first grain: a hole, not zeros written out.
    const pieces: Array<number | { hole: number }> = [];
    for await (const p of writeVmdk(memorySource(disk))) pieces.push(isHole(p) ? { hole: p.hole } : p.length);
    expect(pieces.slice(0, 3)).toEqual([512, 20 * 512, { hole: (128 - 21) * 512 }]);
    expect(pieces.slice(3).every((p) => typeof p === "number")).toBe(true);
  });

  it("gives each export a new CID", async () => {
    const a = await exportVmdk(Buffer.alloc(MiB), "a.vmdk");
    const b = await exportVmdk(Buffer.alloc(MiB), "b.vmdk");
    const cid = (buf: Buffer) => /CID=([0-9a-f]{8})/.exec(buf.subarray(512, 512 * 21).toString("latin1"))?.[1];
    expect(cid(a)).toMatch(/^[0-9a-f]{8}$/);
    expect(cid(a)).not.toBe(cid(b));
  });
});

// ---------------------------------------------------------------- refusals

describe("openVmdk refuses", () => {
  const small: FormatLimits = { maxVirtualSize: 64 * MiB, maxMetadataBytes: MiB };

  it("a file too small to hold a header", async () => {
    expect((await refusal(Buffer.from("KDMV"))).message).toMatch(/too small/);
  });

  it("a file that is not a VMDK", async () => {
    expect((await refusal(Buffer.alloc(4096, 0x61))).message).toMatch(/not a VMDK/);
  });

  it("a truncated streamOptimized file", async () => {
    const out = await exportVmdk(sampleDisk(2 * MiB), "out.vmdk");
    expect((await refusal(out.subarray(0, out.length - 4096))).message).toMatch(/footer/);
    expect((await refusal(out.subarray(0, 1024))).message).toMatch(/footer|truncated/);
  });

  it("a truncated monolithicSparse file", async () => {
    const buf = buildSparse(sampleDisk(2 * MiB));
    expect((await refusal(buf.subarray(0, buf.length - 70000))).message).toMatch(/outside the \d+-byte file/);
    expect((await refusal(buf.subarray(0, 10000))).message).toMatch(/descriptor .* lies outside the 10000-byte file/);
    expect((await refusal(buf.subarray(0, 11000))).message).toMatch(/grain (directory|table).* lies outside the 11000-byte file/);
  });

  it("a grain directory past the end of the file", async () => {
    const buf = buildSparse(sampleDisk(2 * MiB));
    buf.writeBigUInt64LE(BigInt(buf.length / 512 + 10), 56);
    expect((await refusal(buf)).message).toMatch(/grain directory at offset \d+ .* lies outside/);
    const out = Buffer.from(await exportVmdk(sampleDisk(2 * MiB), "out.vmdk"));
    out.writeBigUInt64LE(2n ** 40n, out.length - 1024 + 56); // the footer's
    expect((await refusal(out)).message).toMatch(/grain directory.*outside/);
  });

  it("an absurd capacity", async () => {
    const buf = buildSparse(sampleDisk(2 * MiB));
    expect((await refusal(buf, { maxVirtualSize: MiB, maxMetadataBytes: MiB })).message).toMatch(/more than the largest allowed disk/);
    buf.writeBigUInt64LE(2n ** 50n, 12);
    expect((await refusal(buf, small)).message).toMatch(/more than the largest allowed disk/);
    buf.writeBigUInt64LE(2n ** 63n, 12);
    expect((await refusal(buf, small)).message).toMatch(/capacity .* out of range/);
  });

  it("grain tables larger than the metadata limit", async () => {
    const buf = buildSparse(sparseDisk(60 * MiB), { grainSectors: 1 });
    expect((await refusal(buf, { maxVirtualSize: 64 * MiB, maxMetadataBytes: 8 * 1024 })).message).toMatch(/grain directory and tables need more than the 8192 bytes of metadata allowed/);
    expect((await refusal(buf, { maxVirtualSize: 64 * MiB, maxMetadataBytes: 512 })).message).toMatch(/grain directory is 960 bytes, more than the 512 bytes/);
  });

  it("a grain that does not inflate", async () => {
    const out = Buffer.from(await exportVmdk(sampleDisk(2 * MiB), "out.vmdk"));
    out[128 * 512 + 12 + 100] ^= 0xff;
    expect((await refusal(out)).message).toMatch(/compressed grain 0 does not inflate/);
  });

  it("a grain that inflates to the wrong size", async () => {
    const out = Buffer.from(await exportVmdk(sampleDisk(2 * MiB), "out.vmdk"));
    const packed = zlib.deflateSync(Buffer.alloc(4096, 1));
    out.writeUInt32LE(packed.length, 128 * 512 + 8);
    packed.copy(out, 128 * 512 + 12);
    expect((await refusal(out)).message).toMatch(/inflates to 4096 bytes instead of 65536/);
    const big = zlib.deflateSync(Buffer.alloc(2 * BLOCK_SIZE, 1));
    out.writeUInt32LE(big.length, 128 * 512 + 8);
    big.copy(out, 128 * 512 + 12);
    expect((await refusal(out)).message).toMatch(/compressed grain 0 does not inflate/);
  });

  it("a delta disk (a descriptor with a parentCID)", async () => {
    const buf = buildSparse(sampleDisk(MiB));
    const at = buf.indexOf("parentCID=ffffffff");
    buf.write("parentCID=1234abcd", at, "latin1");
    expect((await refusal(buf)).message).toMatch(/has a parent disk .*parentCID 1234abcd/);
    const hint = buildSparse(sampleDisk(MiB), { descriptor: descriptorFor(2048, 'parentFileNameHint="base.vmdk"') });
    expect((await refusal(hint)).message).toMatch(/has a parent disk "base.vmdk"/);
  });

  it("an embedded descriptor with several extents", async () => {
    const text = descriptorFor(2048).replace(/RW .*\n/, 'RW 1024 SPARSE "a.vmdk"\nRW 1024 SPARSE "b.vmdk"\n');
    expect((await refusal(buildSparse(sampleDisk(MiB), { descriptor: text }))).message).toMatch(/refers to other files \(2 extents/);
  });

  it("a text descriptor naming flat extents", async () => {
    const text = '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n\nRW 4096 VMFS "disk-flat.vmdk"\n';
    const err = await refusal(Buffer.from(text.padEnd(1024, "\n")));
    expect(err.message).toMatch(/refers to other files \(createType "vmfs", extent "disk-flat.vmdk"\)/);
  });

  it("unknown compression, odd grain sizes, unknown versions", async () => {
    const base = buildSparse(sampleDisk(MiB));
    const patched = (f: (b: Buffer) => void) => {
      const b = Buffer.from(base);
      f(b);
      return b;
    };
    expect((await refusal(patched((b) => b.writeUInt16LE(7, 77)))).message).toMatch(/unknown compression algorithm \(7\)/);
    for (const g of [0, 3, 96, 4096]) {
      expect((await refusal(patched((b) => b.writeBigUInt64LE(BigInt(g), 20)))).message).toMatch(/grain size is \d+ sectors; only powers of two from 1 to 2048/);
    }
    expect((await refusal(patched((b) => b.writeUInt32LE(4, 4)))).message).toMatch(/version 4/);
    expect((await refusal(patched((b) => b.write("\r\n\n ", 73, "latin1")))).message).toMatch(/text \(ASCII\) mode/);
  });

  it("grain table entries pointing inside the metadata", async () => {
    const buf = buildSparse(sampleDisk(MiB));
    const { gts } = layout(buf);
    buf.writeUInt32LE(2, gts[0]); // the descriptor
    expect((await refusal(buf)).message).toMatch(/grain 0 points inside its descriptor/);
    buf.writeUInt32LE(gts[0] / 512, gts[0]); // its own grain table
    expect((await refusal(buf)).message).toMatch(/grain 0 points inside its grain table 0/);
  });

  it("grain tables shared between directory entries, and grains shared between entries", async () => {
    const buf = buildSparse(sparseDisk(60 * MiB));
    const { gdOffset } = layout(buf);
    buf.writeUInt32LE(buf.readUInt32LE(gdOffset), gdOffset + 4);
    expect((await refusal(buf)).message).toMatch(/grain table 1 .* overlaps its grain table 0/);
    // Every entry of a table naming the same grain: more grain data than the file holds.
    const one = buildSparse(sparseDisk(32 * MiB));
    const gt = layout(one).gts[0];
    const grain = one.readUInt32LE(gt);
    for (let e = 0; e < 512; e++) one.writeUInt32LE(grain, gt + e * 4);
    expect((await refusal(one)).message).toMatch(/more grain data than the file holds/);
  });

  it("a grain marker naming another grain", async () => {
    const out = Buffer.from(await exportVmdk(sampleDisk(2 * MiB), "out.vmdk"));
    out.writeBigUInt64LE(128n, 128 * 512);
    expect((await refusal(out)).message).toMatch(/grain marker for grain 0 names sector 128/);
  });
});

// ---------------------------------------------------------------- fuzzing

const FUZZ_LIMITS: FormatLimits = { maxVirtualSize: 64 * MiB, maxMetadataBytes: MiB };

/** Opens and reads everything with a deadline: "ok", or the FormatError; anything else fails. */
async function fuzzOnce(buf: Buffer): Promise<"ok" | FormatError> {
  const attempt = async () => {
    const reader = await openVmdk(bufferSource(buf), FUZZ_LIMITS);
    if (reader.virtualSize > FUZZ_LIMITS.maxVirtualSize) throw new Error(`virtual size ${reader.virtualSize} beyond the limit`);
    let end = 0;
    let total = 0;
    for await (const e of reader.extents()) {
      if (e.offset < end) throw new Error(`extent at ${e.offset} goes backwards (previous ended at ${end})`);
      if (e.data.length === 0 || e.offset + e.data.length > reader.virtualSize) throw new Error(`extent at ${e.offset} (${e.data.length} bytes) runs past the virtual size ${reader.virtualSize}`);
      end = e.offset + e.data.length;
      total += e.data.length;
    }
    if (total > reader.virtualSize) throw new Error("yielded more than the virtual size");
    return "ok" as const;
  };
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error("timed out")), 20_000); // a hang, not a busy machine
  });
  try {
    return await Promise.race([attempt(), deadline]);
  } catch (err) {
    if (err instanceof FormatError) return err;
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/** Mutates bytes where they matter: header, descriptor, directory, tables, markers, footer. */
function mutate(valid: Buffer, rnd: () => number): Buffer {
  const buf = Buffer.from(valid);
  const l = layout(valid);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rnd() * xs.length)];
  const regions: [number, number][] = [
    [l.headerAt, l.headerAt + 80],
    [l.headerAt, l.headerAt + 512],
    [l.descriptor[0], l.descriptor[0] + Math.min(l.descriptor[1], 600)],
    [l.gdOffset, l.gdOffset + l.gdBytes],
    ...l.gts.map((gt): [number, number] => [gt, gt + 2048]),
    ...l.grains.slice(0, 8).map((g): [number, number] => [g, g + 16]),
    ...l.gts.map((gt): [number, number] => [gt - 512, gt - 496]),
    [l.gdOffset - 512, l.gdOffset - 496],
    [valid.length - 1536, valid.length],
    [0, valid.length],
  ].filter(([a, b]) => a >= 0 && b <= valid.length && b > a) as [number, number][];
  const n = 1 + Math.floor(rnd() * 4);
  for (let i = 0; i < n; i++) {
    const [a, b] = pick(regions);
    const at = a + Math.floor(rnd() * (b - a));
    const how = rnd();
    if (how < 0.35) buf[at] = Math.floor(rnd() * 256);
    else if (how < 0.55) buf[at] ^= 1 << Math.floor(rnd() * 8);
    else if (how < 0.75) buf[at] = pick([0, 1, 0x7f, 0x80, 0xff]);
    else if (at + 4 <= buf.length)
      buf.writeUInt32LE(pick([0, 1, 2, 0xffffffff, 0x7fffffff, Math.floor(rnd() * 2 ** 32), Math.floor(rnd() * (valid.length / 512 + 64))]), at - (at % 4 === 0 ? 0 : at % 4));
  }
  if (rnd() < 0.08) return buf.subarray(0, Math.floor(rnd() * buf.length));
  return buf;
}

async function fuzz(samples: [string, Buffer][], iterations: number, seed: number) {
  const rnd = prng(seed);
  const tally: Record<string, { ok: number; refused: number }> = {};
  for (const [name, valid] of samples) {
    expect(await fuzzOnce(valid)).toBe("ok");
    tally[name] = { ok: 0, refused: 0 };
    for (let i = 0; i < iterations; i++) {
      const buf = mutate(valid, rnd);
      let result: "ok" | FormatError;
      try {
        result = await fuzzOnce(buf);
      } catch (err) {
        throw new Error(`${name}, iteration ${i} (seed ${seed}): ${(err as Error).stack}`, { cause: err });
      }
      if (result === "ok") tally[name].ok++;
      else tally[name].refused++;
    }
  }
  for (const t of Object.values(tally)) expect(t.refused).toBeGreaterThan(0);
  return tally;
}

describe("fuzzing openVmdk", () => {
  it("survives mutated monolithicSparse and streamOptimized files: accepted or FormatError, never another error", async () => {
    const disk = sparseDisk(40 * MiB);
    const stream = await exportVmdk(disk, "s.vmdk");
    const tally = await fuzz(
      [
        ["monolithicSparse", buildSparse(disk)],
        ["monolithicSparse, 4 KiB grains, zeroed grains", buildSparse(sparseDisk(6 * MiB), { grainSectors: 8, zeroGrains: [3, 700, 1200] })],
        ["streamOptimized", stream],
      ],
      300,
      20240601,
    );
    expect(Object.keys(tally)).toHaveLength(3);
  });

  it("survives mutated files qemu-img wrote", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    fs.writeFileSync(file("disk.raw"), sparseDisk(40 * MiB));
    qemu(["convert", "-f", "raw", "-O", "vmdk", file("disk.raw"), file("m.vmdk")]);
    qemu(["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", file("disk.raw"), file("s.vmdk")]);
    await fuzz(
      [
        ["qemu monolithicSparse", fs.readFileSync(file("m.vmdk"))],
        ["qemu streamOptimized", fs.readFileSync(file("s.vmdk"))],
      ],
      200,
      777,
    );
  });
});
