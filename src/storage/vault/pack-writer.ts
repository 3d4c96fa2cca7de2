import crypto from "node:crypto";
import type { BlobStore, BlobWriter } from "../blob-store";
import { ChunkCodec } from "../codec";
import { HashSet } from "../hash-list";
import { BLOCK_SIZE } from "../volume-store";
import { packKey } from "./chunk";

/** Intents to write blobs (see pending-blobs.ts): a pack is pending from before its blob exists until it is indexed. */
export interface BlobIntents {
  intend(key: string): Promise<void>;
  /** The writes of `keys` were given up: their blobs are ordinary garbage now. */
  giveUp(keys: Iterable<string>): Promise<void>;
}

/** Packs are written once they reach this size. */
export const PACK_BYTES = 16 * 1024 * 1024;
/** Packs one writer writes at once. */
const PACKS_IN_FLIGHT = 2;

/** The chunks written to a pack, in the order they sit in it: their hashes and parallel lists of their places and forms. */
export interface PackIndex {
  chunks: HashSet;
  offsets: number[];
  stored: number[];
  raw: number[];
  compressed: boolean[];
}

const newPackIndex = (): PackIndex => ({ chunks: new HashSet(), offsets: [], stored: [], raw: [], compressed: [] });

/** Appends a chunk, new to the pack, at `offset` of it. */
function indexChunk(index: PackIndex, hash: Buffer, offset: number, stored: number, raw: number, compressed: boolean): void {
  index.chunks.add(hash);
  index.offsets.push(offset);
  index.stored.push(stored);
  index.raw.push(raw);
  index.compressed.push(compressed);
}

/** Indexes a durable pack (see ChunkIndex); returns the bytes it added to the vault. */
export type IndexPack = (packId: string, size: number, index: PackIndex) => Promise<number>;

/**
 * The one way chunks get into packs, for backups and imports as for garbage
 * collection rewriting packs: chunks are compressed with zstd on the codec's
 * workers (kept raw when that does not help), or come already in their stored
 * form, and are streamed into the pack's blob as they come, so no pack is held
 * in memory. A full pack is made durable and indexed while the next one fills;
 * every pack gets 256 random bits for a name. Only after the blob is durable is
 * it indexed (`indexPack`, one transaction), so an indexed chunk always has its
 * bytes.
 */
export class PackWriter {
  /** The pack being filled. */
  private pack: { id: string; writer: BlobWriter; size: number; index: PackIndex } | null = null;
  /** Chunks of packs being closed, each set until its pack is indexed. */
  private readonly closing = new Set<HashSet>();
  private inflight: Promise<void>[] = [];
  /** Keys of packs opened and not yet indexed: pending, so no collector takes them meanwhile. */
  private readonly pending = new Set<string>();
  /** Bytes this writer added to the vault. */
  storedBytes = 0;

  constructor(
    private readonly blobs: BlobStore,
    private readonly codec: ChunkCodec,
    private readonly projectId: string,
    /** Indexes a durable pack and, in the same transaction, fulfils its intent. */
    private readonly indexPack: IndexPack,
    private readonly intents: BlobIntents,
  ) {}

  /** Whether this writer already holds the chunk at byte `at` of `hash` (written or being written). */
  has(hash: Uint8Array, at = 0): boolean {
    if (this.pack?.index.chunks.has(hash, at)) return true;
    for (const c of this.closing) if (c.has(hash, at)) return true;
    return false;
  }

  /**
   * Adds the blocks of `data` (each BLOCK_SIZE bytes) named by `blocks`: `slot` is
   * a block's place in `data`, `hash` its SHA-256. Blocks this writer already
   * holds are skipped. `data` moves to the codec (or back to its pool when every
   * block is skipped).
   */
  async addBlocks(data: Buffer, blocks: { hash: Buffer; slot: number }[]): Promise<void> {
    const fresh: { hash: Buffer; slot: number }[] = [];
    const seen = new HashSet(blocks.length);
    for (const b of blocks) if (!this.has(b.hash) && seen.add(b.hash)) fresh.push(b);
    const buffers = this.codec.buffers;
    if (!fresh.length) {
      buffers.give(data);
      return;
    }
    const packed = await this.codec.compress(
      data,
      BLOCK_SIZE,
      fresh.map((b) => b.slot),
      buffers.take(ChunkCodec.bound(fresh.length, BLOCK_SIZE)),
    );
    buffers.give(packed.data);
    await this.addStored(fresh.map((b, k) => ({ hash: b.hash, stored: packed.chunks[k], raw: BLOCK_SIZE, compressed: packed.compressed[k] })));
    buffers.give(packed.out);
  }

  /**
   * Appends chunks already in their stored form (compressed when `compressed`) to
   * the pack, skipping those this writer holds. Their buffers are free again once
   * this resolves.
   */
  async addStored(chunks: { hash: Buffer; stored: Buffer; raw: number; compressed: boolean }[]): Promise<void> {
    let parts: Buffer[] = [];
    for (const c of chunks) {
      if (this.has(c.hash)) continue;
      const pack = this.pack ?? (await this.open());
      indexChunk(pack.index, c.hash, pack.size, c.stored.length, c.raw, c.compressed);
      pack.size += c.stored.length;
      parts.push(c.stored);
      if (pack.size >= PACK_BYTES) {
        await pack.writer.write(parts);
        parts = [];
        await this.rotate();
      }
    }
    if (parts.length) await this.pack!.writer.write(parts);
  }

  private async open() {
    const id = crypto.randomBytes(32).toString("hex");
    const key = packKey(this.projectId, id);
    await this.intents.intend(key);
    this.pending.add(key);
    this.pack = { id, writer: null as unknown as BlobWriter, size: 0, index: newPackIndex() };
    this.pack.writer = await this.blobs.openWriter(key);
    return this.pack;
  }

  /**
   * Closes the filled pack: makes it durable, then indexes it, in the background.
   * Up to PACKS_IN_FLIGHT packs close at once; beyond that it waits for the oldest.
   */
  private async rotate(): Promise<void> {
    while (this.inflight.length >= PACKS_IN_FLIGHT) await this.inflight.shift(); // a failed close surfaces here
    const pack = this.pack;
    if (!pack) return;
    this.pack = null;
    this.closing.add(pack.index.chunks);
    const close = (async () => {
      const size = await pack.writer.close();
      const added = await this.indexPack(pack.id, size, pack.index);
      this.pending.delete(packKey(this.projectId, pack.id));
      this.storedBytes += added; // not `+= await`: that would read the total before another close adds to it
      this.closing.delete(pack.index.chunks);
    })();
    close.catch(() => undefined); // awaited by a later rotate or flush
    this.inflight.push(close);
  }

  /** Writes what is left; once it returns, every chunk added so far is durable and indexed. */
  async flush(): Promise<void> {
    await this.rotate();
    while (this.inflight.length) await this.inflight.shift();
  }

  /** Drops the pack being filled (a job that failed); packs already closed stay for garbage collection. */
  async abort(): Promise<void> {
    const pack = this.pack;
    this.pack = null;
    await pack?.writer.abort().catch(() => undefined);
    await Promise.allSettled(this.inflight);
    this.inflight = [];
    await this.intents.giveUp(this.pending).catch(() => undefined); // then they are garbage like any unindexed pack
    this.pending.clear();
  }
}
