import type { DataSource } from "typeorm";
import type { BlobStore } from "../blob-store";
import { ChunkCodec } from "../codec";
import type { BlockSource } from "../manifest";
import type { PackChunks, ReadOptions } from "./chunk";
import { ChunkIndex } from "./chunk-index";
import { GarbageCollector, type Reclaimed } from "./garbage";
import { PackWriter, type BlobIntents } from "./pack-writer";
import { dropIntents, intendBlob } from "../pending-blobs";
import { ChunkReader } from "./reader";
import { VaultBlocks } from "./block-cache";
import { countRestoreBlocks, planRestore, type RestoreBatch } from "./restore-plan";

export { ChunkError, hex, packKey, type PackChunks, type ReadOptions } from "./chunk";
export { PACK_BYTES, type PackWriter } from "./pack-writer";
export type { PackToWrite, RestoreBatch } from "./restore-plan";
export type { Reclaimed } from "./garbage";
export type { VaultBlocks } from "./block-cache";

/**
 * The vault: content-addressed, compressed, deduplicated chunks of every backup
 * and image, per project, in pack blobs; Postgres indexes where each chunk lives.
 * Its parts: the pack writer (the one write path), the chunk index, the reader,
 * restore planning and garbage collection. No SQL of the vault leaves it.
 */
export class Vault {
  private readonly index: ChunkIndex;
  private readonly reader: ChunkReader;
  private readonly garbage: GarbageCollector;
  /** Blocks read as they are (backups and images served over NBD), through a bounded cache. */
  readonly blocks: VaultBlocks;
  private readonly intents: BlobIntents = {
    intend: (key) => intendBlob(this.ds, key),
    giveUp: (keys) => dropIntents(this.ds, keys),
  };

  constructor(
    private readonly ds: DataSource,
    readonly blobs: BlobStore,
    readonly codec: ChunkCodec = new ChunkCodec(1, 0),
    cacheBytes = 64 * 1024 * 1024,
  ) {
    this.index = new ChunkIndex(ds);
    this.reader = new ChunkReader(blobs, codec, this.index);
    this.blocks = new VaultBlocks(this.reader, cacheBytes);
    // A rewritten pack holds chunks the index has: indexing it repoints them.
    this.garbage = new GarbageCollector(ds, blobs, codec, (projectId) => new PackWriter(blobs, codec, projectId, (id, size, idx) => this.index.movePack(projectId, id, size, idx), this.intents));
  }

  /** A writer of new chunks into the project's packs. */
  writer(projectId: string): PackWriter {
    return new PackWriter(this.blobs, this.codec, projectId, (id, size, idx) => this.index.addPack(projectId, id, size, idx), this.intents);
  }

  /** Which of `hashes` the project's vault already holds (hex). */
  existing(projectId: string, hashes: Buffer[]): Promise<Set<string>> {
    return this.index.existing(projectId, hashes);
  }

  /** Where the distinct chunks of `hashes` (back to back) sit, per pack in pack order; ChunkError for one the vault lacks. */
  locate(projectId: string, hashes: Buffer): Promise<PackChunks[]> {
    return this.index.locate(projectId, hashes);
  }

  /** Each distinct chunk's bytes by hex hash, checked (see ChunkReader.readChunks). */
  readChunks(projectId: string, hashes: Buffer[], opts: ReadOptions = {}): Promise<Map<string, Buffer>> {
    return this.reader.readChunks(projectId, hashes, opts);
  }

  /** The distinct chunks of `hashes` in runs of pooled buffers (see ChunkReader.readRuns). */
  readRuns(projectId: string, hashes: Buffer[], opts: ReadOptions = {}): AsyncGenerator<{ hashes: Buffer[]; data: Buffer }> {
    return this.reader.readRuns(projectId, hashes, opts);
  }

  /** The chunks of a stream of batches of located packs (see ChunkReader.readPacks). */
  readPacks<B extends { packs: PackChunks[] }>(projectId: string, batches: AsyncIterable<B> | Iterable<B>, opts: ReadOptions = {}) {
    return this.reader.readPacks(projectId, batches, opts);
  }

  /** The blocks of [first, last] of disk `diskId` that a restore of `source` writes (their hashes differ). */
  restoreCount(source: BlockSource, diskId: string, first: number, last: number): Promise<number> {
    return countRestoreBlocks(this.ds, source, diskId, first, last);
  }

  /** What makes blocks [first, last] of disk `diskId` read as `source`: the packs to read and the blocks to zero (see planRestore). */
  restorePlan(projectId: string, source: BlockSource, diskId: string, first: number, last: number): Promise<RestoreBatch> {
    return planRestore(this.ds, projectId, source, diskId, first, last);
  }

  /** Reclaims what nothing references in the project's vault (see GarbageCollector.collectGarbage); null when a collector runs. */
  collectGarbage(projectId: string, graceMs: number): Promise<Reclaimed | null> {
    return this.garbage.collectGarbage(projectId, graceMs);
  }

  /** Reclaims what a failed job wrote between `from` and `to` (see GarbageCollector.dropUnreferencedPacks); null when a collector runs. */
  dropUnreferencedPacks(projectId: string, from: Date, to: Date): Promise<Reclaimed | null> {
    return this.garbage.dropUnreferencedPacks(projectId, from, to);
  }
}
