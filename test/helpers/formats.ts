import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import zlib from "node:zlib";
import type { ByteRange, ImageReader, RandomAccessSource, WriteSource, WriterPiece } from "../../src/formats/types";
import { BLOCK_SIZE, isHole, materialize } from "../../src/formats/types";
import { requireProgram } from "./external";

/** qemu-img, or null when STOWAGE_SKIP_EXTERNAL=1 (otherwise a missing one fails, naming qemu-utils). */
export const qemuImg = () => requireProgram(["/usr/bin/qemu-img"], "qemu-utils");

export function qemu(args: string[]): string {
  return execFileSync("/usr/bin/qemu-img", args, { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

export function tmpDir(prefix = "stowage-fmt-"): { dir: string; cleanup(): void } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => fs.rmSync(dir, { recursive: true, force: true }) };
}

/** A file on disk as a RandomAccessSource, counting the bytes read. */
export function fileSource(file: string): RandomAccessSource & { bytesRead: number; close(): void } {
  const fd = fs.openSync(file, "r");
  const size = fs.fstatSync(fd).size;
  const src = {
    size,
    bytesRead: 0,
    async read(offset: number, length: number) {
      if (offset < 0 || offset + length > size) throw new Error(`read past the end: ${offset}+${length} > ${size}`);
      const buf = Buffer.alloc(length);
      fs.readSync(fd, buf, 0, length, offset);
      src.bytesRead += length;
      return buf;
    },
    async readInto(offset: number, into: Buffer) {
      if (offset < 0 || offset + into.length > size) throw new Error(`read past the end: ${offset}+${into.length} > ${size}`);
      fs.readSync(fd, into, 0, into.length, offset);
      src.bytesRead += into.length;
    },
    close: () => fs.closeSync(fd),
  };
  return src;
}

export function bufferSource(buf: Buffer): RandomAccessSource {
  return {
    size: buf.length,
    async read(offset, length) {
      if (offset < 0 || offset + length > buf.length) throw new Error(`read past the end: ${offset}+${length} > ${buf.length}`);
      return buf.subarray(offset, offset + length);
    },
  };
}

/** The whole virtual disk a reader describes (small disks only), checking the extent rules on the way. */
export async function readAll(reader: ImageReader): Promise<Buffer> {
  const out = Buffer.alloc(reader.virtualSize);
  let last = 0;
  for await (const e of reader.extents()) {
    if (e.offset < last) throw new Error(`extent at ${e.offset} overlaps or goes backwards (previous ended at ${last})`);
    if (e.offset + e.data.length > reader.virtualSize) throw new Error(`extent at ${e.offset} runs past the virtual size`);
    e.data.copy(out, e.offset);
    last = e.offset + e.data.length;
  }
  return out;
}

/** A WriteSource over an in-memory disk image (small disks only). */
export function memorySource(disk: Buffer): WriteSource {
  const zero = Buffer.alloc(BLOCK_SIZE);
  const indexes: number[] = [];
  for (let i = 0; i * BLOCK_SIZE < disk.length; i++) {
    const block = disk.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE);
    if (!block.equals(zero.subarray(0, block.length))) indexes.push(i);
  }
  return {
    virtualSize: disk.length,
    async *allocated() {
      yield* indexes;
    },
    async *blocks() {
      for (const index of indexes) {
        const data = Buffer.alloc(BLOCK_SIZE);
        disk.copy(data, 0, index * BLOCK_SIZE, Math.min(disk.length, (index + 1) * BLOCK_SIZE));
        yield { index, data };
      }
    },
  };
}

/** A disk of `size` bytes holding `blocks` (64 KiB block index → bytes), in the map's order. */
export function blocksSource(size: number, blocks: Map<number, Buffer>): WriteSource {
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

/**
 * Writes a writer's output to `file` as a sparse-capable sink does: bytes at their
 * offsets, holes skipped with a seek, the length set at the end (a file may end in
 * a hole). Returns the file's size. With `maxBytes`, fails as soon as the writer
 * yields more bytes than that (holes not counted), before a disk fills up.
 */
export async function writeFile(file: string, pieces: AsyncIterable<WriterPiece>, opts: { maxBytes?: number } = {}): Promise<number> {
  const fd = fs.openSync(file, "w");
  let at = 0;
  let written = 0;
  try {
    for await (const p of pieces) {
      if (isHole(p)) {
        if (!Number.isSafeInteger(p.hole) || p.hole <= 0) throw new Error(`a hole of ${p.hole} bytes`);
        at += p.hole;
        continue;
      }
      written += p.length;
      if (opts.maxBytes !== undefined && written > opts.maxBytes) throw new Error(`the writer yielded more than ${opts.maxBytes} bytes besides holes`);
      for (let done = 0; done < p.length;) done += fs.writeSync(fd, p, done, p.length - done, at + done);
      at += p.length;
    }
    fs.ftruncateSync(fd, at);
  } finally {
    fs.closeSync(fd);
  }
  return at;
}

/** A writer's whole output in one buffer, holes as zeros (small files only). */
export async function bytesOf(pieces: AsyncIterable<WriterPiece>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of materialize(pieces)) parts.push(Buffer.from(b));
  return Buffer.concat(parts);
}

/** A test disk: a few MiB with random, text and zero regions, and data in odd places. */
export function sampleDisk(size = 8 * 1024 * 1024, seed = 1): Buffer {
  const disk = Buffer.alloc(size);
  const key = crypto.createHash("sha256").update(`disk:${seed}`).digest();
  const rnd = (n: number) => {
    const c = crypto.createCipheriv("aes-256-ctr", key, crypto.randomBytes(16));
    return c.update(Buffer.alloc(n));
  };
  rnd(1024 * 1024).copy(disk, 0);
  Buffer.from("the quick brown fox jumps over the lazy dog\n".repeat(30000)).copy(disk, 2 * 1024 * 1024);
  rnd(4096).copy(disk, 5 * 1024 * 1024 + 512);
  rnd(700).copy(disk, size - 700);
  return disk;
}

/** mulberry32: a small seeded PRNG returning floats in [0, 1), so every run mutates the same way. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ---------------------------------------------------------------------------
// Large sparse files: fixtures of many GiB whose holes cost no disk space.

/** Deterministic bytes, none of them zero-filled runs: AES-CTR under a key made from `seed`. */
export function pattern(length: number, seed: number): Buffer {
  const key = crypto.createHash("sha256").update(`pattern:${seed}`).digest();
  return crypto.createCipheriv("aes-256-ctr", key, Buffer.alloc(16)).update(Buffer.alloc(length));
}

/** Writes all of `buf` at `offset` of the open file `fd`. */
export function pwrite(fd: number, buf: Buffer, offset: number): void {
  for (let done = 0; done < buf.length;) done += fs.writeSync(fd, buf, done, buf.length - done, offset + done);
}

/** A sparse raw file of `size` bytes holding `pieces`, zeros (holes) elsewhere. */
export function sparseFile(file: string, size: number, pieces: { offset: number; data: Buffer }[]): void {
  const fd = fs.openSync(file, "w");
  try {
    for (const p of pieces) pwrite(fd, p.data, p.offset);
    fs.ftruncateSync(fd, size);
  } finally {
    fs.closeSync(fd);
  }
}

/** Bytes of a file that take disk space (its holes take none). */
export const allocatedBytes = (file: string) => fs.statSync(file).blocks * 512;

/** The data ranges of a file as its file system tells them (SEEK_DATA/SEEK_HOLE, asked through qemu-img map on the file as raw). */
export function fileDataRanges(file: string): ByteRange[] {
  const map = JSON.parse(qemu(["map", "--output=json", "-f", "raw", file])) as Array<{ start: number; length: number; data: boolean }>;
  return map.filter((m) => m.data).map((m) => ({ offset: m.start, length: m.length }));
}

/**
 * The source, knowing its holes: dataRanges answers from `ranges` (ascending, apart),
 * clipped to the range asked for, as a source with SEEK_DATA/SEEK_HOLE would.
 */
export function withDataRanges<S extends RandomAccessSource>(src: S, ranges: ByteRange[]): S & { dataRanges(offset: number, length: number): AsyncIterable<ByteRange> } {
  return Object.assign(src, {
    async *dataRanges(offset: number, length: number) {
      const end = offset + length;
      let lo = 0;
      let hi = ranges.length;
      while (lo < hi) {
        const mid = (lo + hi) >>> 1;
        if (ranges[mid].offset + ranges[mid].length > offset) hi = mid;
        else lo = mid + 1;
      }
      for (let i = lo; i < ranges.length && ranges[i].offset < end; i++) {
        const s = Math.max(offset, ranges[i].offset);
        const e = Math.min(end, ranges[i].offset + ranges[i].length);
        if (e > s) yield { offset: s, length: e - s };
      }
    },
  });
}

/**
 * Writes a reader's extents into a sparse raw file of its virtual size (each at its
 * offset, holes between), checking the extent rules; returns what it yielded.
 */
export async function extentsToRaw(reader: ImageReader, file: string): Promise<{ bytes: number; extents: Array<[number, number]> }> {
  const fd = fs.openSync(file, "w");
  const extents: Array<[number, number]> = [];
  let bytes = 0;
  let last = 0;
  try {
    for await (const e of reader.extents()) {
      if (e.offset < last) throw new Error(`extent at ${e.offset} overlaps or goes backwards (previous ended at ${last})`);
      if (e.offset + e.data.length > reader.virtualSize) throw new Error(`extent at ${e.offset} runs past the virtual size`);
      pwrite(fd, e.data, e.offset);
      last = e.offset + e.data.length;
      bytes += e.data.length;
      const prev = extents[extents.length - 1];
      if (prev && prev[0] + prev[1] === e.offset) prev[1] += e.data.length;
      else extents.push([e.offset, e.data.length]);
    }
    fs.ftruncateSync(fd, reader.virtualSize);
  } finally {
    fs.closeSync(fd);
  }
  return { bytes, extents };
}

/** A piece of a disk placed in a fixture: its bytes at `offset` of the disk, stored at `at` in the file. */
export interface Placed {
  offset: number;
  data: Buffer;
  at: number;
}

const SECTOR = 512;

/**
 * A hosted sparse VMDK laid out by hand in `file`, its grains wherever `grains`
 * puts them (sector-aligned file offsets, ascending, holes between): header,
 * descriptor, grain directory and the grain tables that have grains, then the
 * grains. A grain's `offset` is a multiple of the grain size and its data at most
 * a grain. With `stream`, a streamOptimized file: each grain deflated behind its
 * marker, then the tables, the directory, the footer and the end-of-stream marker.
 */
export function vmdkFile(file: string, opts: { size: number; grainSectors?: number; stream?: boolean; grains: Placed[] }): void {
  const g = opts.grainSectors ?? 128;
  const grainBytes = g * SECTOR;
  const capacity = Math.ceil(opts.size / SECTOR);
  const tables = Math.ceil(Math.ceil(capacity / g) / 512);
  const gdSectors = Math.ceil((tables * 4) / SECTOR);
  const gd = Buffer.alloc(gdSectors * SECTOR);
  const gts = new Map<number, Buffer>();
  const gtOf = (t: number) => gts.get(t) ?? gts.set(t, Buffer.alloc(512 * 4)).get(t)!;
  const descriptor = Buffer.alloc(20 * SECTOR);
  descriptor.write(
    `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="${opts.stream ? "streamOptimized" : "monolithicSparse"}"\n\n` +
      `# Extent description\nRW ${capacity} SPARSE "disk.vmdk"\n\n#DDB\nddb.adapterType = "lsilogic"\n`,
  );
  const header = (gdOffset: bigint, overHead: number) => {
    const h = Buffer.alloc(SECTOR);
    h.write("KDMV", 0, "latin1");
    h.writeUInt32LE(opts.stream ? 3 : 1, 4);
    h.writeUInt32LE(opts.stream ? 1 | (1 << 16) | (1 << 17) : 1, 8);
    h.writeBigUInt64LE(BigInt(capacity), 12);
    h.writeBigUInt64LE(BigInt(g), 20);
    h.writeBigUInt64LE(1n, 28);
    h.writeBigUInt64LE(20n, 36);
    h.writeUInt32LE(512, 44);
    h.writeBigUInt64LE(gdOffset, 56);
    h.writeBigUInt64LE(BigInt(overHead), 64);
    h.write("\n \r\n", 73, "latin1");
    h.writeUInt16LE(opts.stream ? 1 : 0, 77);
    return h;
  };
  const fd = fs.openSync(file, "w");
  try {
    pwrite(fd, descriptor, SECTOR);
    let end = 21 * SECTOR;
    if (!opts.stream) {
      // Directory and tables first, then the grains.
      const used = [...new Set(opts.grains.map((p) => Math.floor(p.offset / grainBytes / 512)))].sort((a, b) => a - b);
      used.forEach((t, k) => gd.writeUInt32LE(21 + gdSectors + 4 * k, t * 4));
      end = (21 + gdSectors + 4 * used.length) * SECTOR;
    }
    for (const p of opts.grains) {
      const grain = p.offset / grainBytes;
      if (!Number.isInteger(grain) || p.data.length > grainBytes || p.at % SECTOR !== 0 || p.at < end) throw new Error(`grain at disk offset ${p.offset} cannot go at ${p.at}`);
      gtOf(Math.floor(grain / 512)).writeUInt32LE(p.at / SECTOR, (grain % 512) * 4);
      let bytes = p.data;
      if (opts.stream) {
        const packed = zlib.deflateSync(Buffer.concat([p.data, Buffer.alloc(grainBytes - p.data.length)]));
        const marker = Buffer.alloc(12);
        marker.writeBigUInt64LE(BigInt(grain * g), 0);
        marker.writeUInt32LE(packed.length, 8);
        bytes = Buffer.concat([marker, packed]);
      }
      pwrite(fd, bytes, p.at);
      end = p.at + Math.ceil(bytes.length / SECTOR) * SECTOR;
    }
    if (!opts.stream) {
      pwrite(fd, header(21n, 21 + gdSectors + 4 * gts.size), 0);
      pwrite(fd, gd, 21 * SECTOR);
      for (const [t, gt] of gts) pwrite(fd, gt, gd.readUInt32LE(t * 4) * SECTOR);
      fs.ftruncateSync(fd, Math.max(end, fs.fstatSync(fd).size));
      return;
    }
    // streamOptimized: the tables, each behind its marker, then the directory, the footer, the end-of-stream marker.
    const marker = (sectors: number, type: number) => {
      const m = Buffer.alloc(SECTOR);
      m.writeBigUInt64LE(BigInt(sectors), 0);
      m.writeUInt32LE(type, 12);
      return m;
    };
    pwrite(fd, header(0xffffffffffffffffn, 128), 0);
    for (const [t, gt] of [...gts].sort((a, b) => a[0] - b[0])) {
      pwrite(fd, marker(4, 1), end);
      gd.writeUInt32LE(end / SECTOR + 1, t * 4);
      pwrite(fd, gt, end + SECTOR);
      end += 5 * SECTOR;
    }
    pwrite(fd, marker(gdSectors, 2), end);
    const gdAt = end / SECTOR + 1;
    pwrite(fd, gd, end + SECTOR);
    end += (1 + gdSectors) * SECTOR;
    pwrite(fd, marker(1, 3), end);
    pwrite(fd, header(BigInt(gdAt), 128), end + SECTOR);
    pwrite(fd, Buffer.alloc(SECTOR), end + 2 * SECTOR);
  } finally {
    fs.closeSync(fd);
  }
}

/** One's complement of the byte sum of `buf`, the 4-byte checksum field at `at` counted as zeros. */
export function vhdChecksum(buf: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) if (i < at || i >= at + 4) sum += buf[i];
  return ~sum >>> 0;
}

/** A VHD footer with the maximum geometry, so that QEMU too takes the current size. */
export function vhdFooter(opts: { size: number; type: number; dataOffset: bigint; creator?: string; creatorVersion?: number }): Buffer {
  const f = Buffer.alloc(512);
  f.write("conectix", 0, "latin1");
  f.writeUInt32BE(2, 8);
  f.writeUInt32BE(0x00010000, 12);
  f.writeBigUInt64BE(opts.dataOffset, 16);
  f.write(opts.creator ?? "test", 28, "latin1");
  f.writeUInt32BE(opts.creatorVersion ?? 0x00010000, 32);
  f.write("Wi2k", 36, "latin1");
  f.writeBigUInt64BE(BigInt(opts.size), 40);
  f.writeBigUInt64BE(BigInt(opts.size), 48);
  f.writeUInt16BE(65535, 56);
  f.writeUInt8(16, 58);
  f.writeUInt8(255, 59);
  f.writeUInt32BE(opts.type, 60);
  f.writeUInt32BE(vhdChecksum(f, 64), 64);
  return f;
}

/**
 * A dynamic VHD laid out by hand in `file`: footer copy, header, block allocation
 * table, the blocks, and the footer. Each piece of `blocks` puts its data at its
 * disk offset, inside the block whose sector bitmap (all sectors present) starts at
 * `at` in the file; pieces of one block share its `at`, blocks go in ascending file
 * order with holes between, and what no piece covers reads as zeros.
 */
export function vhdFile(file: string, opts: { size: number; blockSize?: number; blocks: Placed[] }): void {
  const blockSize = opts.blockSize ?? 2 * 1024 * 1024;
  const entries = Math.ceil(opts.size / blockSize);
  const batBytes = Math.max(SECTOR, Math.ceil((entries * 4) / SECTOR) * SECTOR);
  const bitmapSize = Math.ceil(blockSize / SECTOR / 8 / SECTOR) * SECTOR;
  const footer = vhdFooter({ size: opts.size, type: 3, dataOffset: 512n });
  const header = Buffer.alloc(1024);
  header.write("cxsparse", 0, "latin1");
  header.writeBigUInt64BE(0xffffffffffffffffn, 8);
  header.writeBigUInt64BE(1536n, 16);
  header.writeUInt32BE(0x00010000, 24);
  header.writeUInt32BE(entries, 28);
  header.writeUInt32BE(blockSize, 32);
  header.writeUInt32BE(vhdChecksum(header, 36), 36);
  const bat = Buffer.alloc(batBytes, 0xff);
  const fd = fs.openSync(file, "w");
  try {
    let end = 1536 + batBytes;
    for (const b of opts.blocks) {
      const index = Math.floor(b.offset / blockSize);
      const inBlock = b.offset - index * blockSize;
      if (inBlock + b.data.length > blockSize || b.at % SECTOR !== 0) throw new Error(`data at disk offset ${b.offset} does not fit its block at ${b.at}`);
      if (bat.readUInt32BE(index * 4) !== b.at / SECTOR) {
        if (b.at < end || bat.readUInt32BE(index * 4) !== 0xffffffff) throw new Error(`block ${index} cannot go at ${b.at}`);
        bat.writeUInt32BE(b.at / SECTOR, index * 4);
        pwrite(fd, Buffer.alloc(bitmapSize, 0xff), b.at);
        end = b.at + bitmapSize + Math.min(blockSize, opts.size - index * blockSize);
      }
      pwrite(fd, b.data, b.at + bitmapSize + inBlock);
    }
    pwrite(fd, footer, 0);
    pwrite(fd, header, 512);
    pwrite(fd, bat, 1536);
    pwrite(fd, footer, end);
  } finally {
    fs.closeSync(fd);
  }
}

/** A fixed VHD in `file`: a disk of `size` bytes holding `data` at their offsets (holes elsewhere), then the footer. */
export function fixedVhdFile(file: string, size: number, data: Array<{ offset: number; data: Buffer }>): void {
  const fd = fs.openSync(file, "w");
  try {
    for (const d of data) pwrite(fd, d.data, d.offset);
    pwrite(fd, vhdFooter({ size, type: 2, dataOffset: 0xffffffffffffffffn }), size);
  } finally {
    fs.closeSync(fd);
  }
}
