import { HASH_BYTES, hashOf, packedHashes } from "../../db/sql";
import { BlobNotFoundError, type BlobStore } from "../blob-store";
import { DecodeError, type ChunkCodec } from "../codec";
import { mapOrdered } from "../pipeline";
import { BLOCK_SIZE } from "../volume-store";
import { ChunkError, hex, packKey, type PackChunks, type ReadOptions } from "./chunk";
import type { ChunkIndex } from "./chunk-index";

/** Range reads (and their decoding) in flight at once. */
const READS_IN_FLIGHT = 4;
/** A range read of a pack takes at most this many chunks (4 MiB of raw bytes). */
const RUN_CHUNKS = 64;

/**
 * Reads chunks out of their packs: nearby chunks of a pack in one range read,
 * each decompressed and checked on the codec's workers, a few reads in flight.
 */
export class ChunkReader {
  constructor(
    private readonly blobs: BlobStore,
    private readonly codec: ChunkCodec,
    private readonly index: ChunkIndex,
  ) {}

  /**
   * Reads and checks chunks on the codec's workers: each is decompressed and
   * checked against its checksum (or its SHA-256, see ReadOptions). Returns each
   * distinct chunk's bytes by hex hash.
   */
  async readChunks(projectId: string, hashes: Buffer[], opts: ReadOptions = {}): Promise<Map<string, Buffer>> {
    const out = new Map<string, Buffer>();
    for await (const run of this.readRuns(projectId, hashes, opts)) {
      for (let k = 0; k < run.hashes.length; k++) out.set(hex(run.hashes[k]), run.data.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE));
    }
    return out;
  }

  /**
   * Reads the distinct chunks of `hashes` in the order they sit in the packs:
   * nearby chunks of a pack come with one range read, a few reads and decodes
   * are in flight at once, and each run comes back as its chunks' raw bytes back
   * to back (every chunk BLOCK_SIZE bytes). Each chunk is checked (see readChunks).
   * A pack that garbage collection rewrote meanwhile is looked up again once.
   * A run's `data` comes from the codec's buffer pool: give it back once done with it.
   */
  async *readRuns(projectId: string, hashes: Buffer[], opts: ReadOptions = {}): AsyncGenerator<{ hashes: Buffer[]; data: Buffer }> {
    if (!hashes.length) return;
    const packs = await this.index.locate(projectId, packedHashes(hashes));
    for await (const run of this.readPacks(projectId, [{ packs }], opts)) {
      if (!run.data) continue;
      const ids: Buffer[] = [];
      for (let k = run.from; k < run.to; k++) ids.push(hashOf(run.pack.hashes, k));
      yield { hashes: ids, data: run.data };
    }
  }

  /**
   * Reads the chunks of a stream of batches, each a list of located packs (see
   * ChunkIndex.locate), with reads in flight across the batches' borders: each
   * batch comes first as itself (`data` null), then its runs: chunks [from, to)
   * of one of its packs, their raw bytes back to back in `data` (see readRuns).
   */
  async *readPacks<B extends { packs: PackChunks[] }>(
    projectId: string,
    batches: AsyncIterable<B> | Iterable<B>,
    opts: ReadOptions = {},
  ): AsyncGenerator<{ batch: B; pack: B["packs"][number]; from: number; to: number; data: Buffer } | { batch: B; pack: null; data: null }> {
    const self = this;
    const steps = async function* () {
      for await (const batch of batches) {
        yield { batch, pack: null, from: 0, to: 0 };
        for (const pack of batch.packs) for (const [from, to] of self.runs(pack)) yield { batch, pack, from, to };
      }
    };
    yield* mapOrdered(steps(), READS_IN_FLIGHT + 1, async ({ batch, pack, from, to }) =>
      pack ? { batch, pack, from, to, data: await this.fetch(projectId, pack, from, to, true, opts) } : { batch, pack: null, data: null },
    );
  }

  /** Chunks of a pack close to each other, up to RUN_CHUNKS of them, make one range read: [from, to) of the pack's list. */
  private runs(pack: PackChunks): [number, number][] {
    const out: [number, number][] = [];
    const n = pack.raw.length;
    let i = 0;
    while (i < n) {
      let j = i + 1;
      let end = pack.offsets[i] + pack.stored[i];
      while (j < n && pack.offsets[j] - end < 65536 && j - i < RUN_CHUNKS) {
        end = Math.max(end, pack.offsets[j] + pack.stored[j]);
        j++;
      }
      out.push([i, j]);
      i = j;
    }
    return out;
  }

  /** Reads and decodes chunks [from, to) of a pack into one pooled buffer. */
  private async fetch(projectId: string, pack: PackChunks, from: number, to: number, retry: boolean, opts: ReadOptions): Promise<Buffer> {
    const start = pack.offsets[from];
    let end = start;
    for (let k = from; k < to; k++) end = Math.max(end, pack.offsets[k] + pack.stored[k]);
    const hashAtRun = (k: number) => hex(hashOf(pack.hashes, from + k));
    const buffers = this.codec.buffers;
    const buf = buffers.take(end - start);
    try {
      await this.blobs.readInto(packKey(projectId, pack.packId), start, buf);
    } catch (err) {
      buffers.give(buf);
      if (err instanceof BlobNotFoundError && retry) return this.refetch(projectId, pack, from, to, opts);
      if (err instanceof BlobNotFoundError) throw new ChunkError(hashAtRun(0), "missing", `its pack ${pack.packId.slice(0, 12)}… is gone`);
      if (err instanceof Error && /shorter than/.test(err.message)) throw new ChunkError(hashAtRun(0), "corrupt", "its pack is truncated");
      throw err;
    }
    const offsets = pack.offsets.slice(from, to);
    for (let k = 0; k < offsets.length; k++) offsets[k] -= start;
    const chunks = {
      offsets,
      stored: pack.stored.slice(from, to),
      raw: pack.raw.slice(from, to),
      compressed: pack.compressed.slice(from, to),
      hashes: pack.hashes.subarray(from * HASH_BYTES, to * HASH_BYTES),
    };
    try {
      const { data, out } = await this.codec.decode(buf, chunks, buffers.take((to - from) * BLOCK_SIZE), { sha256: opts.sha256 });
      buffers.give(data);
      return out;
    } catch (err) {
      if (err instanceof DecodeError) {
        const detail = {
          truncated: "its pack is truncated",
          undecompressable: "it does not decompress, or fails its checksum",
          length: "it has the wrong length",
          hash: "its SHA-256 does not match",
        }[err.problem];
        throw new ChunkError(hashAtRun(err.chunk), "corrupt", detail);
      }
      throw err;
    }
  }

  /** The pack is gone (rewritten by garbage collection): find chunks [from, to) again and read them where they are now, in the same order. */
  private async refetch(projectId: string, pack: PackChunks, from: number, to: number, opts: ReadOptions): Promise<Buffer> {
    const place = new Map<string, number>();
    for (let k = from; k < to; k++) place.set(hex(hashOf(pack.hashes, k)), k - from);
    const out = this.codec.buffers.take((to - from) * BLOCK_SIZE);
    for (const moved of await this.index.locate(projectId, pack.hashes.subarray(from * HASH_BYTES, to * HASH_BYTES))) {
      for (const [f, t] of this.runs(moved)) {
        const data = await this.fetch(projectId, moved, f, t, false, opts);
        for (let k = f; k < t; k++) data.copy(out, place.get(hex(hashOf(moved.hashes, k)))! * BLOCK_SIZE, (k - f) * BLOCK_SIZE, (k - f + 1) * BLOCK_SIZE);
        this.codec.buffers.give(data);
      }
    }
    return out;
  }
}
