import crypto from "node:crypto";
import type { Worker } from "node:worker_threads";
import { CCtx, compressBound, CParameter } from "zstd-napi/binding";
import { ChunkCodec, DecodeError, type StoredChunk } from "../../../src/storage/codec";
import { BLOCK, bytes, KiB } from "../../helpers/data";

const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest();
const TEXT = Buffer.from("the quick brown fox jumps over the lazy dog\n".repeat(2000)).subarray(0, BLOCK);
const ZSTD_MAGIC = 0xfd2fb528;

/** Four 64 KiB blocks: random, text, zeros, random. */
function sample(): Buffer {
  return Buffer.concat([bytes(BLOCK, 11), TEXT, Buffer.alloc(BLOCK), bytes(BLOCK, 12)]);
}
const blockOf = (data: Buffer, i: number) => data.subarray(i * BLOCK, (i + 1) * BLOCK);

/** What decode needs to read back the chunks compress made of `which` blocks of `original`. */
function storedChunks(chunks: Buffer[], compressed: boolean[], original: Buffer, which: number[]): StoredChunk[] {
  let offset = 0;
  return chunks.map((c, k) => {
    const s = { offset, stored: c.length, raw: BLOCK, compressed: compressed[k], hash: sha256(blockOf(original, which[k])) };
    offset += c.length;
    return s;
  });
}

async function decodeError(p: Promise<unknown>): Promise<DecodeError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DecodeError);
  return err as DecodeError;
}

describe.each([
  ["inline (0 threads)", 0],
  ["on 2 worker threads", 2],
])("ChunkCodec %s", (_name, threads) => {
  let codec: ChunkCodec;
  beforeAll(() => {
    codec = new ChunkCodec(1, threads);
  });
  afterAll(async () => {
    await codec.close();
  });

  it("runs on the number of workers it was given", () => {
    expect(codec.threads).toBe(threads);
  });

  it("hashes each block with SHA-256 and gives null for all-zero blocks, handing the data back intact", async () => {
    const original = sample();
    const { data, hashes } = await codec.hash(Buffer.from(original), BLOCK);
    expect(data.equals(original)).toBe(true);
    expect(hashes).toHaveLength(4);
    expect(hashes[0]!.equals(sha256(blockOf(original, 0)))).toBe(true);
    expect(hashes[1]!.equals(sha256(TEXT))).toBe(true);
    expect(hashes[2]).toBeNull();
    expect(hashes[3]!.equals(sha256(blockOf(original, 3)))).toBe(true);
  });

  it("hashes a short last block over its own bytes", async () => {
    const original = Buffer.concat([bytes(BLOCK, 13), bytes(1000, 14)]);
    const { hashes } = await codec.hash(Buffer.from(original), BLOCK);
    expect(hashes.map((h) => h!.toString("hex"))).toEqual([sha256(original.subarray(0, BLOCK)), sha256(original.subarray(BLOCK))].map((h) => h.toString("hex")));
  });

  it("leaves a small buffer from Node's shared pool, and its neighbours, usable", async () => {
    const neighbour = Buffer.from("a neighbour in the same pool");
    const small = Buffer.from("hello, small buffer");
    const { hashes } = await codec.hash(small, BLOCK);
    expect(hashes[0]!.equals(sha256(Buffer.from("hello, small buffer")))).toBe(true);
    expect(small.toString()).toBe("hello, small buffer");
    expect(neighbour.toString()).toBe("a neighbour in the same pool");
  });

  it("compresses every block into a zstd frame with a content checksum, within the bound", async () => {
    const original = sample();
    const { data, out, chunks, compressed } = await codec.compress(Buffer.from(original), BLOCK);
    expect(data.equals(original)).toBe(true);
    expect(chunks).toHaveLength(4);
    expect(compressed).toEqual([true, true, true, true]);
    for (const c of chunks) {
      expect(c.readUInt32LE(0)).toBe(ZSTD_MAGIC);
      expect(c[4] & 0x04).toBe(0x04); // Content_Checksum_flag
    }
    expect(out.length).toBe(chunks.reduce((n, c) => n + c.length, 0));
    expect(out.length).toBeLessThanOrEqual(ChunkCodec.bound(4, BLOCK));
    // Chunks sit back to back in `out`.
    expect(Buffer.concat(chunks).equals(out)).toBe(true);
    // Random bytes cost only a frame's header and checksum; text and zeros shrink.
    expect(chunks[0].length).toBeGreaterThan(BLOCK);
    expect(chunks[0].length).toBeLessThanOrEqual(BLOCK + 16);
    expect(chunks[1].length).toBeLessThan(BLOCK / 10);
    expect(chunks[2].length).toBeLessThan(100);
  });

  it("compresses only the blocks `which` names, in its order, repeats included, and decodes them back", async () => {
    const original = sample();
    for (const which of [[3], [2, 0], [3, 1, 3, 0], [1, 1, 1]]) {
      const { chunks, compressed, out } = await codec.compress(Buffer.from(original), BLOCK, which);
      expect(chunks).toHaveLength(which.length);
      const { out: raw } = await codec.decode(Buffer.from(out), storedChunks(chunks, compressed, original, which));
      expect(raw.equals(Buffer.concat(which.map((i) => blockOf(original, i))))).toBe(true);
    }
  });

  it("decodes chunks found anywhere in the buffer, checked against their checksum", async () => {
    const original = sample();
    const { chunks } = await codec.compress(Buffer.from(original), BLOCK);
    // Lay the frames out in reverse with gaps between them.
    const gap = Buffer.alloc(333, 0xee);
    const parts: Buffer[] = [];
    const list: StoredChunk[] = [];
    let pos = 0;
    for (const k of [3, 2, 1, 0]) {
      parts.push(gap);
      pos += gap.length;
      list.push({ offset: pos, stored: chunks[k].length, raw: BLOCK, compressed: true, hash: sha256(blockOf(original, k)) });
      parts.push(chunks[k]);
      pos += chunks[k].length;
    }
    const { data, out } = await codec.decode(Buffer.concat(parts), list);
    expect(data.length).toBe(pos);
    expect(out.equals(Buffer.concat([3, 2, 1, 0].map((i) => blockOf(original, i))))).toBe(true);
  });

  it("decodes a block shorter than the block size at the end", async () => {
    const original = Buffer.concat([bytes(BLOCK, 15), Buffer.from("tail".repeat(100))]);
    const { chunks, out } = await codec.compress(Buffer.from(original), BLOCK);
    const list: StoredChunk[] = [
      { offset: 0, stored: chunks[0].length, raw: BLOCK, compressed: true, hash: sha256(original.subarray(0, BLOCK)) },
      { offset: chunks[0].length, stored: chunks[1].length, raw: 400, compressed: true, hash: sha256(original.subarray(BLOCK)) },
    ];
    expect((await codec.decode(Buffer.from(out), list, undefined, { sha256: true })).out.equals(original)).toBe(true);
  });

  it("stores raw chunks too: copied and checked against their SHA-256", async () => {
    const block = bytes(BLOCK, 16);
    const ok = await codec.decode(Buffer.from(block), [{ offset: 0, stored: BLOCK, raw: BLOCK, compressed: false, hash: sha256(block) }]);
    expect(ok.out.equals(block)).toBe(true);
    const wrong = await decodeError(codec.decode(Buffer.from(block), [{ offset: 0, stored: BLOCK, raw: BLOCK, compressed: false, hash: sha256(Buffer.from("other")) }]));
    expect(wrong).toMatchObject({ chunk: 0, problem: "hash" });
  });

  it("names the chunk whose frame was corrupted (undecompressable)", async () => {
    const original = sample();
    const { out, chunks, compressed } = await codec.compress(Buffer.from(original), BLOCK);
    const list = storedChunks(chunks, compressed, original, [0, 1, 2, 3]);
    for (const [k, at] of [
      [0, 1000], // inside the raw payload of a random block: only the checksum can tell
      [1, Math.floor(chunks[1].length / 2)], // inside compressed text
      [3, chunks[3].length - 1], // the checksum itself
      [2, 0], // the magic number
    ]) {
      const bad = Buffer.from(out);
      bad[list[k].offset + at] ^= 0x10;
      const err = await decodeError(codec.decode(bad, list));
      expect(err).toMatchObject({ chunk: k, problem: "undecompressable" });
      expect(err.message).toMatch(new RegExp(`chunk ${k}\\b`));
    }
    // The codec still works after failures.
    expect((await codec.decode(Buffer.from(out), list)).out.equals(original)).toBe(true);
  });

  it("a wrong expected hash passes where the frame's checksum decides, and fails with sha256: true", async () => {
    const original = sample();
    const { out, chunks, compressed } = await codec.compress(Buffer.from(original), BLOCK);
    const list = storedChunks(chunks, compressed, original, [0, 1, 2, 3]);
    list[2] = { ...list[2], hash: sha256(Buffer.from("not the zero block")) };
    expect((await codec.decode(Buffer.from(out), list)).out.equals(original)).toBe(true);
    expect(await decodeError(codec.decode(Buffer.from(out), list, undefined, { sha256: true }))).toMatchObject({ chunk: 2, problem: "hash" });
    // With the right hashes, sha256: true passes.
    const right = storedChunks(chunks, compressed, original, [0, 1, 2, 3]);
    expect((await codec.decode(Buffer.from(out), right, undefined, { sha256: true })).out.equals(original)).toBe(true);
  });

  it("checks a frame without a content checksum against its SHA-256", async () => {
    const block = Buffer.concat([TEXT.subarray(0, BLOCK / 2), bytes(BLOCK / 2, 17)]);
    const plain = new CCtx();
    plain.setParameter(CParameter.checksumFlag, 0);
    const frame = Buffer.alloc(compressBound(BLOCK));
    const n = plain.compress2(frame, block);
    const stored = frame.subarray(0, n);
    expect(stored[4] & 0x04).toBe(0);
    const chunk = { offset: 0, stored: n, raw: BLOCK, compressed: true, hash: sha256(block) };
    expect((await codec.decode(Buffer.from(stored), [chunk])).out.equals(block)).toBe(true);
    expect(await decodeError(codec.decode(Buffer.from(stored), [{ ...chunk, hash: sha256(TEXT) }]))).toMatchObject({ chunk: 0, problem: "hash" });
  });

  it("reports a chunk running past the buffer as truncated, and a wrong raw size as length", async () => {
    const original = sample();
    const { out, chunks, compressed } = await codec.compress(Buffer.from(original), BLOCK);
    const list = storedChunks(chunks, compressed, original, [0, 1, 2, 3]);
    expect(await decodeError(codec.decode(Buffer.from(out.subarray(0, out.length - 5)), list))).toMatchObject({ chunk: 3, problem: "truncated" });
    // The frame of block 1 holds 64 KiB, not 64 KiB + 1.
    const longer = list.map((c, k) => (k === 1 ? { ...c, raw: BLOCK + 1 } : c));
    expect(await decodeError(codec.decode(Buffer.from(out), longer))).toMatchObject({ chunk: 1, problem: "length" });
    // A raw chunk whose stored size differs from its raw size.
    const block = bytes(BLOCK, 18);
    expect(await decodeError(codec.decode(Buffer.from(block), [{ offset: 0, stored: BLOCK - 1, raw: BLOCK, compressed: false, hash: sha256(block) }]))).toMatchObject({
      chunk: 0,
      problem: "length",
    });
  });

  it("moves a buffer of its own to the worker and back, whole", async () => {
    const original = sample();
    const data = Buffer.allocUnsafeSlow(original.length);
    original.copy(data);
    const packed = await codec.compress(data, BLOCK);
    if (threads > 0) expect(data.length).toBe(0); // moved, not copied
    expect(packed.data.equals(original)).toBe(true);
    expect(packed.data.buffer).toBeInstanceOf(ArrayBuffer);
    const list = storedChunks(packed.chunks, packed.compressed, original, [0, 1, 2, 3]);
    expect((await codec.decode(Buffer.from(packed.out), list)).out.equals(original)).toBe(true);
  });

  it("compresses into a target from its buffer pool, in place, and the buffers come back usable", async () => {
    const original = sample();
    const buffers = codec.buffers;
    const data = buffers.take(original.length);
    original.copy(data);
    const target = buffers.take(ChunkCodec.bound(4, BLOCK));
    const packed = await codec.compress(data, BLOCK, undefined, target);
    // The pool's buffers are shared memory: the workers use them in place, and the
    // results are views of the very buffers handed over (no new ArrayBuffer per call).
    expect(data.buffer).toBeInstanceOf(SharedArrayBuffer);
    expect(data.equals(original)).toBe(true);
    expect(packed.data.buffer).toBe(data.buffer);
    expect(packed.out.buffer).toBe(target.buffer);
    expect(packed.out.byteOffset).toBe(target.byteOffset);
    expect(packed.data.equals(original)).toBe(true);

    // Give both back; the pool hands the same memory out again, and it reads and writes.
    const compressedCopy = Buffer.from(packed.out);
    const list = storedChunks(packed.chunks, packed.compressed, original, [0, 1, 2, 3]);
    const dataMemory = packed.data.buffer;
    buffers.give(packed.data);
    const again = buffers.take(compressedCopy.length);
    expect(again.buffer).toBe(dataMemory);
    compressedCopy.copy(again);
    const decoded = await codec.decode(again, list, buffers.take(4 * BLOCK));
    expect(decoded.out.equals(original)).toBe(true);
    expect(decoded.out.buffer.byteLength).toBeGreaterThanOrEqual(1024 * KiB); // the pooled target, not a fresh buffer
    expect(decoded.data.subarray(0, compressedCopy.length).equals(compressedCopy)).toBe(true);
    buffers.give(decoded.data);
    buffers.give(decoded.out);
    buffers.give(packed.out);

    // Round after round through the pool stays correct.
    for (let round = 0; round < 5; round++) {
      const d = buffers.take(original.length);
      original.copy(d);
      const p = await codec.compress(d, BLOCK, [round % 4, 3 - (round % 4)], buffers.take(ChunkCodec.bound(2, BLOCK)));
      buffers.give(p.data);
      const l = storedChunks(p.chunks, p.compressed, original, [round % 4, 3 - (round % 4)]);
      const r = await codec.decode(p.out, l, buffers.take(2 * BLOCK), { sha256: true });
      expect(r.out.equals(Buffer.concat([blockOf(original, round % 4), blockOf(original, 3 - (round % 4))]))).toBe(true);
      buffers.give(r.data);
      buffers.give(r.out);
    }
  });

  it("takes a target too small for the bound as a hint only", async () => {
    const original = sample();
    const small = Buffer.alloc(100);
    const packed = await codec.compress(Buffer.from(original), BLOCK, undefined, small);
    const list = storedChunks(packed.chunks, packed.compressed, original, [0, 1, 2, 3]);
    expect((await codec.decode(packed.out, list, Buffer.alloc(10))).out.equals(original)).toBe(true);
  });

  it("keeps many calls in flight at once, each answered with its own result", async () => {
    const blocks = Array.from({ length: 24 }, (_, i) => (i % 3 === 0 ? bytes(BLOCK, 100 + i) : i % 3 === 1 ? Buffer.from(TEXT).fill(i, 0, 7) : Buffer.alloc(BLOCK)));
    const results = await Promise.all(blocks.map((b) => codec.compress(Buffer.from(b), BLOCK)));
    const decoded = await Promise.all(
      results.map((r, i) => codec.decode(r.out, [{ offset: 0, stored: r.out.length, raw: BLOCK, compressed: true, hash: sha256(blocks[i]) }], undefined, { sha256: true })),
    );
    decoded.forEach((d, i) => expect(d.out.equals(blocks[i])).toBe(true));
  });

  it("rejects a call whose operation fails, and keeps working", async () => {
    await expect(codec.hash(Buffer.from(bytes(BLOCK, 19)), 0)).rejects.toThrow();
    expect((await codec.hash(Buffer.from(TEXT), BLOCK)).hashes[0]!.equals(sha256(TEXT))).toBe(true);
  });

  it("digests a stream of zeros and buffers the same as SHA-256 of the whole stream", async () => {
    const pieces: [Buffer | null, number][] = [
      [bytes(1000, 20), 0],
      [null, 5],
      [TEXT, 3 * 1024 * KiB + 7], // more zeros than one run of them
      [Buffer.alloc(0), 0],
      [bytes(5 * BLOCK + 3, 21), 1],
      [null, 0],
    ];
    // More updates than the digest keeps in flight.
    for (let i = 0; i < 20; i++) pieces.push([bytes(777 + i, 30 + i), i % 4 === 0 ? 4096 : 0]);
    const whole = crypto.createHash("sha256");
    const d = codec.digest();
    for (const [data, zeros] of pieces) {
      whole.update(Buffer.alloc(zeros));
      if (data) whole.update(data);
      const copy = data && Buffer.from(data);
      await d.update(data, zeros);
      if (data) expect(data.equals(copy!)).toBe(true); // the caller keeps its buffer
    }
    expect((await d.digest()).equals(whole.digest())).toBe(true);
  });

  it("keeps interleaved digests apart", async () => {
    const a = codec.digest();
    const b = codec.digest();
    const c = codec.digest();
    const ha = crypto.createHash("sha256");
    const hb = crypto.createHash("sha256");
    for (let i = 0; i < 6; i++) {
      const x = bytes(10_000 + i, 40 + i);
      const y = bytes(3_000 + i, 50 + i);
      await Promise.all([a.update(x), b.update(y, i)]);
      ha.update(x);
      hb.update(Buffer.alloc(i)).update(y);
    }
    expect((await b.digest()).equals(hb.digest())).toBe(true);
    expect((await a.digest()).equals(ha.digest())).toBe(true);
    expect((await c.digest()).equals(crypto.createHash("sha256").digest())).toBe(true); // nothing fed: the empty stream
  });
});

describe("ChunkCodec.bound", () => {
  it("is zstd's bound for one block times the number of blocks, and room for incompressible data", () => {
    expect(ChunkCodec.bound(1, BLOCK)).toBe(compressBound(BLOCK));
    expect(ChunkCodec.bound(64, BLOCK)).toBe(64 * compressBound(BLOCK));
    expect(ChunkCodec.bound(3, BLOCK)).toBeGreaterThan(3 * (BLOCK + 16));
    expect(ChunkCodec.bound(0, BLOCK)).toBe(0);
  });
});

/** The codec's running worker threads, and a promise of their exits. */
const workersOf = (codec: ChunkCodec) => (codec as unknown as { slots: { worker: Worker }[] }).slots.map((s) => s.worker);
const exited = (workers: Worker[]) => Promise.all(workers.map((w) => new Promise<number>((resolve) => w.once("exit", resolve))));

describe("ChunkCodec's workers", () => {
  const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
  let codec: ChunkCodec;
  afterEach(async () => {
    await codec.close();
  });

  it("start with the first operation", async () => {
    codec = new ChunkCodec(1, 2);
    expect(workersOf(codec)).toHaveLength(0);
    expect((await codec.hash(Buffer.from(TEXT), BLOCK)).hashes[0]!.equals(sha256(TEXT))).toBe(true);
    expect(workersOf(codec)).toHaveLength(2);
  });

  it("stop once idle, with the pool's idle buffers, and start again for the next operation", async () => {
    codec = new ChunkCodec(1, 2, 50);
    const pooled = codec.buffers.take(2 ** 20);
    codec.buffers.give(pooled);
    await codec.hash(Buffer.from(TEXT), BLOCK);
    const first = workersOf(codec);
    expect(await exited(first)).toHaveLength(2);
    expect(workersOf(codec)).toHaveLength(0);
    expect(codec.buffers.take(2 ** 20).buffer).not.toBe(pooled.buffer);
    const original = sample();
    const { hashes } = await codec.hash(Buffer.from(original), BLOCK);
    expect(hashes[3]!.equals(sha256(blockOf(original, 3)))).toBe(true);
    const second = workersOf(codec);
    expect(second).toHaveLength(2);
    expect(second.some((w) => first.includes(w))).toBe(false);
  });

  it("stay while a digest is open, whose state lives in one of them", async () => {
    codec = new ChunkCodec(1, 2, 50);
    const digest = codec.digest();
    const a = bytes(3 * BLOCK, 21);
    const b = bytes(BLOCK, 22);
    await digest.update(a);
    const workers = workersOf(codec);
    await sleep(200);
    expect(workersOf(codec)).toEqual(workers);
    await digest.update(b);
    expect((await digest.digest()).equals(sha256(Buffer.concat([a, b])))).toBe(true);
    expect(await exited(workers)).toHaveLength(2);
    expect(workersOf(codec)).toHaveLength(0);
  });

  it("stop once idle after a digest is abandoned (the work it hashed failed)", async () => {
    codec = new ChunkCodec(1, 2, 50);
    const digest = codec.digest();
    await digest.update(bytes(BLOCK, 23));
    const workers = workersOf(codec);
    await digest.abandon();
    expect(await exited(workers)).toHaveLength(2);
    expect(workersOf(codec)).toHaveLength(0);
  });
});

describe("ChunkCodec.close", () => {
  it("terminates its workers", async () => {
    const codec = new ChunkCodec(1, 2);
    expect((await codec.hash(Buffer.from(TEXT), BLOCK)).hashes[0]!.equals(sha256(TEXT))).toBe(true);
    const exits = exited(workersOf(codec));
    await codec.close();
    expect(await exits).toHaveLength(2);
  });

  it("is a no-op with no workers", async () => {
    const codec = new ChunkCodec(1, 0);
    await codec.close();
    expect((await codec.hash(Buffer.from(TEXT), BLOCK)).hashes[0]!.equals(sha256(TEXT))).toBe(true);
  });
});
