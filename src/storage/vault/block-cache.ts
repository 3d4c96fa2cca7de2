import { BLOCK_SIZE } from "../../formats/types";
import { hex } from "./chunk";
import type { ChunkReader } from "./reader";

/**
 * Blocks read straight out of the vault (a backup or image served as it is, a clone's
 * source), each a decompressed, checked chunk, kept in a bounded cache: the least
 * recently used go first once `maxBytes` is reached. Readers of one chunk at the same
 * time share one read, and a sequential reader's next chunks are read ahead in windows.
 * The cache is per project and hash, so a project never reads another's bytes. Blocks
 * are slices of the buffer their read decoded into; a buffer goes when its last block
 * has left (chunks read together are used and dropped together, so this holds little more).
 */
export class VaultBlocks {
  private readonly cache = new Map<string, Buffer>();
  private readonly reading = new Map<string, Promise<Buffer>>();
  private bytes = 0;

  constructor(
    private readonly reader: ChunkReader,
    private readonly maxBytes: number,
  ) {}

  /**
   * The bytes of the chunks `hashes` of the project's vault, in order (BLOCK_SIZE each).
   * The buffers are shared with the cache: copy out of them, never into them.
   * ChunkError when a chunk is missing or does not match its checksum. The chunks
   * `ahead` are read with them into the cache, for the reads that come next.
   */
  async read(projectId: string, hashes: Buffer[], ahead: Buffer[] = []): Promise<Buffer[]> {
    const out: (Buffer | Promise<Buffer>)[] = new Array(hashes.length);
    const wanted = new Map<string, Buffer>();
    for (let k = 0; k < hashes.length; k++) {
      const key = `${projectId}/${hex(hashes[k])}`;
      const hit = this.cache.get(key);
      if (hit) {
        // Most recently used goes last.
        this.cache.delete(key);
        this.cache.set(key, hit);
        out[k] = hit;
        continue;
      }
      const pending = this.reading.get(key);
      if (pending) out[k] = pending;
      else wanted.set(key, hashes[k]);
    }
    this.start(projectId, wanted);
    // Read ahead (a sequential reader's next blocks) unless kept or coming already: a read of its own, so a damaged chunk ahead fails no read that did not ask for it.
    const extra = new Map<string, Buffer>();
    for (const h of ahead) {
      const key = `${projectId}/${hex(h)}`;
      if (!this.cache.has(key) && !this.reading.has(key) && !wanted.has(key)) extra.set(key, h);
    }
    // Only once half the window ahead is unread: a reader moving on a few blocks a request then
    // reads ahead half a window at a time, started while it still reads the other half.
    if (extra.size * 2 < ahead.length) extra.clear();
    this.start(projectId, extra);
    for (let k = 0; k < hashes.length; k++) if (!out[k]) out[k] = this.reading.get(`${projectId}/${hex(hashes[k])}`)!;
    return Promise.all(out);
  }

  /** Starts one read of these chunks (by key), which readers of any of them wait for until it ends. */
  private start(projectId: string, chunks: Map<string, Buffer>): void {
    if (!chunks.size) return;
    const batch = this.fetch(projectId, [...chunks.values()]);
    for (const key of chunks.keys()) {
      const one = batch.then((found) => found.get(key)!);
      one.catch(() => undefined); // awaited by whoever asked, if anyone did
      this.reading.set(key, one);
    }
    const release = () => {
      for (const key of chunks.keys()) this.reading.delete(key);
    };
    batch.then(release, release);
  }

  private async fetch(projectId: string, hashes: Buffer[]): Promise<Map<string, Buffer>> {
    const found = new Map<string, Buffer>();
    for await (const run of this.reader.readRuns(projectId, hashes)) {
      // The run's buffer is kept, not given back to the codec's pool: its blocks are slices of it, so
      // nothing is copied, and it goes once the last of them has left the cache.
      for (let k = 0; k < run.hashes.length; k++) {
        const key = `${projectId}/${hex(run.hashes[k])}`;
        const block = run.data.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE);
        found.set(key, block);
        this.keep(key, block);
      }
    }
    return found;
  }

  private keep(key: string, block: Buffer): void {
    if (this.maxBytes < BLOCK_SIZE || this.cache.has(key)) return;
    this.cache.set(key, block);
    this.bytes += block.length;
    while (this.bytes > this.maxBytes) {
      const [oldest, dropped] = this.cache.entries().next().value as [string, Buffer];
      this.cache.delete(oldest);
      this.bytes -= dropped.length;
    }
  }

  /** Bytes held now (for /metrics and tests). */
  get size(): number {
    return this.bytes;
  }
}
