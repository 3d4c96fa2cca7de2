import { BLOCK_SIZE } from "../../formats/types";
import { hex } from "./chunk";
import type { ChunkReader } from "./reader";

/**
 * Blocks read straight out of the vault (a backup or image served as it is), each a
 * decompressed, checked chunk, kept in a bounded cache: the least recently used go
 * first once `maxBytes` is reached. Readers of one chunk at the same time share one
 * read. The cache is per project and hash, so a project never reads another's bytes.
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
   * ChunkError when a chunk is missing or does not match its checksum.
   */
  async read(projectId: string, hashes: Buffer[]): Promise<Buffer[]> {
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
    if (wanted.size) {
      const batch = this.fetch(projectId, [...wanted.values()]);
      for (const key of wanted.keys()) {
        const one = batch.then((found) => found.get(key)!);
        one.catch(() => undefined); // awaited below, by whoever asked
        this.reading.set(key, one);
      }
      const release = () => {
        for (const key of wanted.keys()) this.reading.delete(key);
      };
      batch.then(release, release);
      for (let k = 0; k < hashes.length; k++) if (!out[k]) out[k] = this.reading.get(`${projectId}/${hex(hashes[k])}`)!;
    }
    return Promise.all(out);
  }

  private async fetch(projectId: string, hashes: Buffer[]): Promise<Map<string, Buffer>> {
    const found = new Map<string, Buffer>();
    for await (const run of this.reader.readRuns(projectId, hashes)) {
      try {
        for (let k = 0; k < run.hashes.length; k++) {
          const key = `${projectId}/${hex(run.hashes[k])}`;
          // A copy of its own: the run's buffer goes back to the codec's pool.
          const block = Buffer.allocUnsafe(BLOCK_SIZE);
          run.data.copy(block, 0, k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE);
          found.set(key, block);
          this.keep(key, block);
        }
      } finally {
        this.reader.giveBack(run.data);
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
