import os from "node:os";
import path from "node:path";
import { Worker } from "node:worker_threads";
import { compressBound } from "zstd-napi/binding";
import { BufferPool } from "./buffer-pool";

const { makeOps } = require("./codec-ops.js") as { makeOps(level: number): Ops };

type Ops = Record<"hash" | "compress" | "decode" | "digest", (args: Record<string, unknown>) => Record<string, unknown>>;
type Op = keyof Ops;

/**
 * Loads the ops module in a worker thread and answers one request at a time, in
 * order. Buffers in SharedArrayBuffer memory are used in place: a result that is
 * a view into one of them goes back as where it sits in that argument, not as a
 * buffer; other result buffers are transferred.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const ops = require(workerData.ops).makeOps(workerData.level);
parentPort.on("message", ({ id, op, args }) => {
  try {
    for (const [k, v] of Object.entries(args)) if (v instanceof Uint8Array && !Buffer.isBuffer(v)) args[k] = Buffer.from(v.buffer, v.byteOffset, v.byteLength);
    const result = ops[op](args);
    const transfer = [];
    for (const [name, v] of Object.entries(result)) {
      if (!ArrayBuffer.isView(v)) continue;
      if (v.buffer instanceof SharedArrayBuffer) {
        const arg = Object.keys(args).find((k) => ArrayBuffer.isView(args[k]) && args[k].buffer === v.buffer && v.byteOffset >= args[k].byteOffset && v.byteOffset + v.byteLength <= args[k].byteOffset + args[k].byteLength);
        if (arg === undefined) throw new Error("a result in shared memory outside its arguments");
        result[name] = { arg, offset: v.byteOffset - args[arg].byteOffset, length: v.byteLength };
        continue;
      }
      if (transfer.includes(v.buffer)) continue;
      // Results move back without a copy; a view into Node's small-buffer pool is copied instead.
      if (v.buffer.byteLength > Buffer.poolSize || (v.byteOffset === 0 && v.byteLength === v.buffer.byteLength)) transfer.push(v.buffer);
    }
    parentPort.postMessage({ id, result }, transfer);
  } catch (err) {
    parentPort.postMessage({ id, error: err && err.message ? err.message : String(err) });
  }
});
`;

/** A chunk to read back: where its stored bytes sit in the buffer handed over, and what they must become. */
export interface StoredChunk {
  offset: number;
  stored: number;
  raw: number;
  compressed: boolean;
  hash: Buffer;
}

/** Chunks to read back as parallel arrays (no object per chunk); `hashes` holds their SHA-256s back to back. */
export interface StoredChunks {
  offsets: Float64Array;
  stored: Uint32Array;
  raw: Uint32Array;
  compressed: Uint8Array;
  hashes: Uint8Array;
}

const packedChunks = (chunks: StoredChunk[]): StoredChunks => ({
  offsets: Float64Array.from(chunks, (c) => c.offset),
  stored: Uint32Array.from(chunks, (c) => c.stored),
  raw: Uint32Array.from(chunks, (c) => c.raw),
  compressed: Uint8Array.from(chunks, (c) => (c.compressed ? 1 : 0)),
  hashes: Buffer.concat(chunks.map((c) => c.hash)),
});

export class DecodeError extends Error {
  constructor(
    /** The position of the bad chunk in the list given to decode. */
    readonly chunk: number,
    readonly problem: "truncated" | "undecompressable" | "length" | "hash",
  ) {
    super(`chunk ${chunk} of the batch is bad (${problem})`);
  }
}

const isShared = (buf: Uint8Array) => buf.buffer instanceof SharedArrayBuffer;

/**
 * Buffers cross to a worker by transfer, with all of their memory: a view into
 * Node's small-buffer pool is copied first. Shared memory crosses as it is.
 */
function own(buf: Buffer): Buffer {
  if (isShared(buf) || (buf.buffer instanceof ArrayBuffer && buf.buffer.byteLength > Buffer.poolSize)) return buf;
  return copyOf(buf);
}

/** A copy in memory of its own (never a slice of Node's shared pool), safe to transfer. */
function copyOf(buf: Buffer): Buffer {
  const copy = Buffer.allocUnsafeSlow(buf.length);
  buf.copy(copy);
  return copy;
}

const asBuffer = (u: Uint8Array) => (Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength));

interface Slot {
  worker: Worker;
  busy: number;
}

/**
 * How long the workers stay without work (and no digest open) before they stop, and the pool's idle
 * buffers go with them. Two idle workers are about 19 MiB of a process that may only serve the API or
 * NBD for hours; the next operation starts them again, a few milliseconds before a job's first batch.
 */
const IDLE_MS = 30_000;

/**
 * The data path's hashing, compression and checked decompression, spread over
 * worker threads so the main thread keeps reading, writing and talking to
 * Postgres meanwhile. Buffers of the pool (shared memory) are used in place;
 * other buffers handed to an operation are moved to the worker
 * (the caller's copy becomes empty) and come back in the result. With no
 * workers, the same code runs inline. The workers start with the first
 * operation and stop after `idleMs` without one.
 */
export class ChunkCodec {
  /** The running workers: none until an operation needs them, and none again once they have been idle for `idleMs`. */
  private slots: Slot[] = [];
  private readonly pending = new Map<number, { resolve(r: Record<string, unknown>): void; reject(e: Error): void }>();
  private readonly inline: Ops | null;
  private next = 0;
  private streams = 0;
  /** Digests started and not finished: their state lives in a worker, which must not stop meanwhile. */
  private openDigests = 0;
  /** When the last operation ended, and the timer that stops idle workers. */
  private lastUsed = 0;
  private idleTimer: NodeJS.Timeout | null = null;
  private closed = false;
  /**
   * Buffers the data path reuses, in shared memory: the workers work in them in
   * place. Moving a buffer to a worker and back instead gave the main thread a
   * new ArrayBuffer per call, which V8 counts as fresh external memory; past a
   * few dozen MiB of it, a full garbage collection runs (dozens a second).
   */
  readonly buffers = new BufferPool(16, true);

  constructor(
    readonly level = 1,
    /** Worker threads (0: every operation runs inline, on the caller's thread). */
    readonly threads = os.availableParallelism(),
    private readonly idleMs = IDLE_MS,
  ) {
    this.inline = threads === 0 ? makeOps(level) : null;
  }

  /** The workers, started if they are not running. */
  private workers(): Slot[] {
    if (this.slots.length) return this.slots;
    for (let i = 0; i < this.threads; i++) {
      const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { level: this.level, ops: path.join(__dirname, "codec-ops.js") } });
      worker.unref();
      const slot = { worker, busy: 0 };
      worker.on("message", ({ id, result, error }: { id: number; result?: Record<string, unknown>; error?: string }) => {
        slot.busy--;
        const p = this.pending.get(id);
        this.pending.delete(id);
        if (this.pending.size === 0) this.idle();
        if (error !== undefined) p?.reject(new Error(error));
        else p?.resolve(result!);
      });
      worker.on("error", (err) => {
        for (const p of this.pending.values()) p.reject(err);
        this.pending.clear();
      });
      this.slots.push(slot);
    }
    return this.slots;
  }

  /** No operation is under way: the workers stop once `idleMs` passes without one (and with no digest open). */
  private idle(): void {
    this.lastUsed = performance.now();
    if (this.idleTimer) return;
    const check = () => {
      this.idleTimer = null;
      if (this.closed || !this.slots.length || this.pending.size || this.openDigests) return;
      const left = this.lastUsed + this.idleMs - performance.now();
      if (left > 0) {
        this.idleTimer = setTimeout(check, left).unref();
        return;
      }
      const stopping = this.slots;
      this.slots = [];
      for (const s of stopping) void s.worker.terminate();
      this.buffers.clear();
    };
    this.idleTimer = setTimeout(check, this.idleMs).unref();
  }

  /** The most bytes `compress` makes of `blocks` blocks of `size` bytes. */
  static bound(blocks: number, size: number): number {
    return blocks * compressBound(size);
  }

  private call(op: Op, args: Record<string, unknown>, transfer: Buffer[], slot?: Slot): Promise<Record<string, unknown>> {
    if (this.closed && !this.inline) return Promise.reject(new Error("the codec's workers are stopped"));
    if (this.inline) {
      try {
        return Promise.resolve(this.inline[op](args));
      } catch (err) {
        return Promise.reject(err as Error);
      }
    }
    const target = slot ?? this.workers().reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.next++;
    target.busy++;
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      target.worker.postMessage(
        { id, op, args },
        transfer.filter((b) => !isShared(b)).map((b) => b.buffer as ArrayBuffer),
      );
    }).then((result) => {
      // A view into a shared argument comes back as its place there.
      for (const [name, v] of Object.entries(result)) {
        const at = v as { arg?: string; offset: number; length: number } | null;
        if (at && typeof at === "object" && typeof at.arg === "string" && !ArrayBuffer.isView(at)) result[name] = (args[at.arg] as Buffer).subarray(at.offset, at.offset + at.length);
      }
      return result;
    });
  }

  /**
   * SHA-256 of each `size`-byte block of `data`, or null for a block of zeros.
   * `data` moves to the worker; use the returned one.
   */
  async hash(data: Buffer, size: number): Promise<{ data: Buffer; hashes: (Buffer | null)[] }> {
    const input = this.inline ? data : own(data);
    const r = await this.call("hash", { data: input, size }, [input]);
    const hashes = asBuffer(r.hashes as Uint8Array);
    const zero = r.zero as Uint8Array;
    return { data: asBuffer(r.data as Uint8Array), hashes: Array.from(zero, (z, i) => (z ? null : hashes.subarray(i * 32, i * 32 + 32))) };
  }

  /**
   * Compresses the blocks `which` (all when absent) of `data`, each `size` bytes,
   * into `target` (at least `bound` bytes, or a new buffer), each a zstd frame
   * with a checksum. `data`
   * and `target` move to the worker, with all of their memory; use the returned ones.
   */
  async compress(data: Buffer, size: number, which?: number[], target?: Buffer): Promise<{ data: Buffer; out: Buffer; chunks: Buffer[]; compressed: boolean[] }> {
    const input = this.inline ? data : own(data);
    const into = target && !this.inline ? own(target) : target;
    const r = await this.call("compress", { data: input, size, which, out: into }, into ? [input, into] : [input]);
    const out = asBuffer(r.out as Uint8Array);
    const stored = r.stored as Uint32Array;
    const chunks: Buffer[] = new Array(stored.length);
    for (let k = 0, pos = 0; k < stored.length; pos += stored[k], k++) chunks[k] = out.subarray(pos, pos + stored[k]);
    return { data: asBuffer(r.data as Uint8Array), out, chunks, compressed: Array.from(r.compressed as Uint8Array, (c) => c === 1) };
  }

  /**
   * Decodes the chunks found in `data` into their raw bytes, back to back in
   * `target` (or a new buffer), each checked against its length and its zstd
   * checksum, or its SHA-256 where it has none or `sha256` is set; throws
   * DecodeError naming the first bad one. `data` and `target` move to the worker,
   * with all of their memory; the results hand them back.
   */
  async decode(data: Buffer, chunks: StoredChunk[] | StoredChunks, target?: Buffer, opts: { sha256?: boolean } = {}): Promise<{ data: Buffer; out: Buffer }> {
    const input = this.inline ? data : own(data);
    const into = target && !this.inline ? own(target) : target;
    const list = Array.isArray(chunks) ? packedChunks(chunks) : chunks;
    const r = await this.call(
      "decode",
      { data: input, offsets: list.offsets, stored: list.stored, raw: list.raw, compressed: list.compressed, hashes: list.hashes, out: into, sha256: opts.sha256 === true },
      into ? [input, into] : [input],
    );
    if (r.bad !== undefined) throw new DecodeError(r.bad as number, r.problem as DecodeError["problem"]);
    return { data: asBuffer(r.data as Uint8Array), out: asBuffer(r.out as Uint8Array) };
  }

  /** A SHA-256 over a stream of buffers, computed on one worker in the order they are given. */
  digest(): StreamDigest {
    this.openDigests++;
    return new StreamDigest(this, this.streams++);
  }

  /** @internal */
  async feed(stream: number, args: { data?: Buffer | Buffer[]; zeros?: number; done?: boolean }): Promise<Record<string, unknown>> {
    // The caller keeps its buffers: the worker gets a copy of its own, in a pooled buffer that comes back.
    const parts = args.data === undefined ? [] : Array.isArray(args.data) ? args.data : [args.data];
    let input: Buffer | undefined;
    if (parts.length) {
      const total = parts.reduce((n, p) => n + p.length, 0);
      input = this.inline && parts.length === 1 ? parts[0] : this.buffers.take(total);
      if (input !== parts[0]) for (let i = 0, at = 0; i < parts.length; at += parts[i].length, i++) parts[i].copy(input, at);
    }
    const slots = this.inline ? [] : this.workers();
    const slot = slots.length ? slots[stream % slots.length] : undefined;
    const r = await this.call("digest", { stream, zeros: args.zeros, done: args.done, data: input }, input && !this.inline ? [input] : [], slot).finally(() => {
      if (args.done) this.openDigests--;
    });
    if (input && input !== parts[0]) this.buffers.give(asBuffer(r.data as Uint8Array));
    return r;
  }

  async close(): Promise<void> {
    if (this.idleTimer) clearTimeout(this.idleTimer);
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
    this.closed = true;
    for (const p of this.pending.values()) p.reject(new Error("the codec's workers are stopped"));
    this.pending.clear();
  }
}

/** Bytes a StreamDigest lets wait at its worker before `update` waits. */
const DIGEST_AHEAD = 32 * 1024 * 1024;

/** Data given to `update` is copied to the worker at once; at most DIGEST_AHEAD bytes wait there. */
export class StreamDigest {
  /** Updates the worker has not finished, oldest first, with their sizes. */
  private inflight: { done: Promise<unknown>; bytes: number }[] = [];
  private bytes = 0;
  private failed: Error | null = null;

  constructor(
    private readonly codec: ChunkCodec,
    private readonly stream: number,
  ) {}

  /**
   * Hashes `zeros` zero bytes, then `data` (one buffer, or parts back to back).
   * Returns once at most DIGEST_AHEAD bytes wait at the worker.
   */
  async update(data: Buffer | Buffer[] | null, zeros = 0): Promise<void> {
    if (this.failed) throw this.failed;
    const done = this.codec.feed(this.stream, { data: data ?? undefined, zeros });
    done.catch((err: Error) => (this.failed ??= err));
    const bytes = Array.isArray(data) ? data.reduce((n, d) => n + d.length, 0) : (data?.length ?? 0);
    this.inflight.push({ done, bytes });
    this.bytes += bytes;
    while (this.inflight.length > 16 || this.bytes > DIGEST_AHEAD) {
      const oldest = this.inflight.shift()!;
      await oldest.done;
      this.bytes -= oldest.bytes;
    }
  }

  /** Ends the stream without its digest (the work it hashed failed): its worker lets go of it, and may stop once idle. */
  async abandon(): Promise<void> {
    await Promise.allSettled(this.inflight.map((u) => u.done));
    this.inflight = [];
    this.bytes = 0;
    await this.codec.feed(this.stream, { done: true }).catch(() => undefined);
  }

  async digest(): Promise<Buffer> {
    await Promise.all(this.inflight.map((u) => u.done));
    this.inflight = [];
    this.bytes = 0;
    if (this.failed) throw this.failed;
    const r = await this.codec.feed(this.stream, { done: true });
    return asBuffer(r.digest as Uint8Array);
  }
}
