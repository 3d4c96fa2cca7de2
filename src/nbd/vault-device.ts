import { BLOCK_SIZE } from "../storage/volume-store";
import { extentsOf, type Extent } from "./disk-writes";

/** The bytes a connection serves: a disk's shared writes, or a backup or image read from the vault. */
export interface ServedBytes {
  readInto(offset: number, into: Buffer): Promise<void>;
  extents(offset: number, length: number): Promise<Extent[]>;
  write(offset: number, data: Buffer | readonly Buffer[]): Promise<void>;
  zero(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  commitNow(): Promise<void>;
}

/** What a vault export needs: the blocks of its backup or image that hold data, and their bytes. */
export interface VaultBlockSource {
  /** The blocks of [first, last] holding data, ascending, each with the SHA-256 naming its chunk. */
  refs(first: number, last: number): Promise<{ index: number; hash: Buffer }[]>;
  /** The bytes of these chunks, in order (shared: copied out of, never into); ChunkError when one is missing or corrupt. `ahead`: read them too, for the reads that come next. */
  read(hashes: Buffer[], ahead?: Buffer[]): Promise<Buffer[]>;
}

/** Blocks of the block map read and kept at once: 64 MiB of the disk per query. */
const REGION_BLOCKS = 1024;
/** Blocks read ahead of a sequential reader (4 MiB): the next requests find them decompressed. */
const READ_AHEAD_BLOCKS = 64;
/** Regions kept per connection (a 32-byte hash per block holding data): 16 GiB of the disk's map at most. */
const REGIONS_KEPT = 256;

/**
 * A backup or an image served read-only as it is: no copy is made. A read
 * resolves each block through the backup's chain (or the image's block list) to
 * its chunk and reads that out of the vault, checked, through the vault's cache;
 * blocks no backup recorded read as zeros. The block list is kept per region, as
 * a backup never changes.
 */
export class VaultDevice implements ServedBytes {
  private readonly regions = new Map<number, Promise<Map<number, Buffer>>>();

  constructor(private readonly source: VaultBlockSource) {}

  private region(r: number): Promise<Map<number, Buffer>> {
    let map = this.regions.get(r);
    if (!map) {
      if (this.regions.size >= REGIONS_KEPT) this.regions.delete(this.regions.keys().next().value!);
      const loading = this.source.refs(r * REGION_BLOCKS, (r + 1) * REGION_BLOCKS - 1).then((refs) => new Map(refs.map((x) => [x.index, x.hash])));
      loading.catch(() => this.regions.delete(r));
      this.regions.set(r, loading);
      map = loading;
    }
    return map;
  }

  async readInto(offset: number, into: Buffer): Promise<void> {
    const end = offset + into.length;
    const first = Math.floor(offset / BLOCK_SIZE);
    const last = Math.floor((end - 1) / BLOCK_SIZE);
    const indexes: number[] = [];
    const hashes: Buffer[] = [];
    for (let i = first; i <= last; i++) {
      const hash = (await this.region(Math.floor(i / REGION_BLOCKS))).get(i);
      const from = Math.max(offset, i * BLOCK_SIZE);
      const to = Math.min(end, (i + 1) * BLOCK_SIZE);
      if (hash) {
        indexes.push(i);
        hashes.push(hash);
      } else into.fill(0, from - offset, to - offset);
    }
    if (!hashes.length) return;
    // A read of several blocks is a sequential reader's: the next blocks come in the same go.
    const ahead: Buffer[] = [];
    if (last > first) {
      for (let i = last + 1; i <= last + READ_AHEAD_BLOCKS; i++) {
        const hash = (await this.regions.get(Math.floor(i / REGION_BLOCKS)))?.get(i);
        if (hash) ahead.push(hash);
      }
    }
    const blocks = await this.source.read(hashes, ahead);
    for (let k = 0; k < indexes.length; k++) {
      const i = indexes[k];
      const from = Math.max(offset, i * BLOCK_SIZE);
      const to = Math.min(end, (i + 1) * BLOCK_SIZE);
      blocks[k].copy(into, from - offset, from - i * BLOCK_SIZE, to - i * BLOCK_SIZE);
    }
  }

  /** Where [offset, offset + length) holds data; the work grows with the blocks holding data, not with the length. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    const refs = await this.source.refs(Math.floor(offset / BLOCK_SIZE), Math.floor((end - 1) / BLOCK_SIZE));
    return extentsOf(
      offset,
      end,
      refs.map((r) => r.index),
    );
  }

  // Vault exports are read-only: the connection refuses writes before they get here.
  write(): Promise<void> {
    return Promise.reject(new Error("a backup or image is served read-only"));
  }

  zero(): Promise<void> {
    return Promise.reject(new Error("a backup or image is served read-only"));
  }

  async flush(): Promise<void> {}

  async commitNow(): Promise<void> {}
}
