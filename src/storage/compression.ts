import { Worker } from "node:worker_threads";
import { Compressor } from "zstd-napi";

/** Plain JavaScript, so workers start without the TypeScript loader. */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const { Compressor } = require(workerData.zstd);
const c = new Compressor();
c.setParameters({ compressionLevel: workerData.level });
parentPort.on("message", ({ id, chunks }) => {
  parentPort.postMessage({ id, out: chunks.map((b) => c.compress(Buffer.from(b.buffer, b.byteOffset, b.byteLength))) });
});
`;

interface Pending {
  resolve(out: Buffer[]): void;
  reject(err: Error): void;
}

/**
 * zstd compression off the main thread: chunks are spread over a few workers so
 * reading, hashing and writing go on while they compress, and this thread
 * compresses its own share meanwhile. With no workers it compresses inline.
 */
export class CompressionPool {
  private readonly workers: Worker[] = [];
  private readonly pending = new Map<number, Pending>();
  private next = 0;
  private turn = 0;
  /** The main thread takes its share too, so every core compresses. */
  private readonly inline: Compressor;

  constructor(
    readonly level = 1,
    size = 0,
  ) {
    this.inline = new Compressor();
    this.inline.setParameters({ compressionLevel: level });
    for (let i = 0; i < size; i++) {
      const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { level, zstd: require.resolve("zstd-napi") } });
      w.unref();
      w.on("message", ({ id, out }: { id: number; out: Uint8Array[] }) => {
        const p = this.pending.get(id);
        this.pending.delete(id);
        p?.resolve(out.map((u) => Buffer.from(u.buffer, u.byteOffset, u.byteLength)));
      });
      w.on("error", (err) => {
        for (const p of this.pending.values()) p.reject(err);
        this.pending.clear();
      });
      this.workers.push(w);
    }
  }

  /** Compresses each chunk; the results keep the order of the input. */
  async compress(chunks: Buffer[]): Promise<Buffer[]> {
    if (!this.workers.length || chunks.length < 4) return chunks.map((c) => this.inline.compress(c));
    // One slice per worker and one for this thread, compressed at the same time.
    const per = Math.ceil(chunks.length / (this.workers.length + 1));
    const parts: Promise<Buffer[]>[] = [];
    for (let i = per; i < chunks.length; i += per) {
      const slice = chunks.slice(i, i + per);
      const id = this.next++;
      const worker = this.workers[this.turn++ % this.workers.length];
      parts.push(
        new Promise<Buffer[]>((resolve, reject) => {
          this.pending.set(id, { resolve, reject });
          worker.postMessage({ id, chunks: slice });
        }),
      );
    }
    const own = chunks.slice(0, per).map((c) => this.inline.compress(c));
    return [own, ...(await Promise.all(parts))].flat();
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}
