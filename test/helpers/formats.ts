import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { ImageReader, RandomAccessSource, WriteSource, WriterPiece } from "../../src/formats/types";
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
      for (let done = 0; done < p.length; ) done += fs.writeSync(fd, p, done, p.length - done, at + done);
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
