import crypto from "node:crypto";
import type { DataSource } from "typeorm";
import { ChunkCodec, DecodeError } from "./codec";
import { mapOrdered } from "./pipeline";
import { BLOCK_SIZE } from "./volume-store";
import { hashArray, hashAt, list, listOf, packedHashes, rows } from "../db/sql";
import { BlobNotFoundError, type BlobStore, type BlobWriter } from "./blob-store";

/** Packs are written once they reach this size. */
export const PACK_BYTES = 16 * 1024 * 1024;
/** Range reads (and their decoding) in flight at once. */
const READS_IN_FLIGHT = 4;
/** Packs one writer writes at once. */
const PACKS_IN_FLIGHT = 2;
/** A range read of a pack takes at most this many chunks (4 MiB of raw bytes). */
const RUN_CHUNKS = 64;
/** A pack whose live chunks fill less than this share of it is rewritten by garbage collection. */
const REPACK_BELOW = 0.5;

export const packKey = (projectId: string, packId: string) => `vault/${projectId}/packs/${packId.slice(0, 2)}/${packId}`;
export const hex = (hash: Buffer) => hash.toString("hex");

export interface ReadOptions {
  /** Check every chunk against its SHA-256, not only its checksum (verification does). */
  sha256?: boolean;
}

export class ChunkError extends Error {
  constructor(
    readonly hash: string,
    readonly problem: "missing" | "corrupt",
    detail: string,
  ) {
    super(`chunk ${hash.slice(0, 16)}… is ${problem}: ${detail}`);
  }
}

interface ChunkLocation {
  hash: Buffer;
  pack_id: string;
  pack_offset: string;
  stored_size: number;
  raw_size: number;
  compressed: boolean;
}

/**
 * Collects new chunks of one project into packs: chunks are compressed with zstd
 * on the codec's workers (kept raw when that does not help) and streamed into
 * the pack's blob as they come, so no pack is held in memory. A full pack is
 * made durable and indexed while the next one fills. Only after the blob is
 * durable does one transaction index its chunks, so an indexed chunk always has
 * its bytes.
 */
export class PackWriter {
  /** The pack being filled. */
  private pack: { id: string; writer: BlobWriter; size: number; entries: PackEntry[]; chunks: Set<string> } | null = null;
  /** Chunks of packs being closed, each set until its pack is indexed. */
  private readonly closing = new Set<Set<string>>();
  private inflight: Promise<void>[] = [];
  /** Bytes this writer added to the vault. */
  storedBytes = 0;

  constructor(
    private readonly vault: Vault,
    private readonly projectId: string,
  ) {}

  /** Whether this writer already holds the chunk (written or being written). */
  has(hash: Buffer): boolean {
    const key = hex(hash);
    if (this.pack?.chunks.has(key)) return true;
    for (const c of this.closing) if (c.has(key)) return true;
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
    const seen = new Set<string>();
    for (const b of blocks) {
      const key = hex(b.hash);
      if (seen.has(key) || this.has(b.hash)) continue;
      seen.add(key);
      fresh.push(b);
    }
    const buffers = this.vault.codec.buffers;
    if (!fresh.length) {
      buffers.give(data);
      return;
    }
    const packed = await this.vault.codec.compress(data, BLOCK_SIZE, fresh.map((b) => b.slot), buffers.take(ChunkCodec.bound(fresh.length, BLOCK_SIZE)));
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
      pack.chunks.add(hex(c.hash));
      pack.entries.push({ hash: c.hash, offset: pack.size, stored: c.stored.length, raw: c.raw, compressed: c.compressed });
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
    this.pack = { id: crypto.randomBytes(32).toString("hex"), writer: null as unknown as BlobWriter, size: 0, entries: [], chunks: new Set() };
    this.pack.writer = await this.vault.blobs.openWriter(packKey(this.projectId, this.pack.id));
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
    this.closing.add(pack.chunks);
    const close = (async () => {
      const size = await pack.writer.close();
      const added = await this.vault.indexPack(this.projectId, pack.id, size, pack.entries);
      this.storedBytes += added; // not `+= await`: that would read the total before another close adds to it
      this.closing.delete(pack.chunks);
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
  }
}

interface PackEntry {
  hash: Buffer;
  offset: number;
  stored: number;
  raw: number;
  compressed: boolean;
}

/**
 * A pack rewritten by garbage collection is named by the SHA-256 of its index
 * (each chunk's hash, place and form), which names its content; a pack written
 * as it fills gets 256 random bits.
 */
function packName(entries: PackEntry[]): string {
  const h = crypto.createHash("sha256");
  const meta = Buffer.alloc(17);
  for (const e of entries) {
    h.update(e.hash);
    meta.writeBigUInt64BE(BigInt(e.offset), 0);
    meta.writeUInt32BE(e.stored, 8);
    meta.writeUInt32BE(e.raw, 12);
    meta[16] = e.compressed ? 1 : 0;
    h.update(meta);
  }
  return h.digest("hex");
}

/**
 * The vault: content-addressed, compressed, deduplicated chunks of every backup
 * and image, per project. Postgres indexes where each chunk lives.
 */
export class Vault {
  constructor(
    private readonly ds: DataSource,
    readonly blobs: BlobStore,
    readonly codec: ChunkCodec = new ChunkCodec(1, 0),
  ) {}

  writer(projectId: string): PackWriter {
    return new PackWriter(this, projectId);
  }

  /** Writes a pack and indexes its chunks; returns the bytes of chunks that were new. */
  async writePack(projectId: string, parts: Buffer[], entries: PackEntry[]): Promise<number> {
    const packId = packName(entries);
    await this.blobs.put(packKey(projectId, packId), parts);
    return this.indexPack(projectId, packId, parts.reduce((n, p) => n + p.length, 0), entries);
  }

  /** Indexes the chunks of a durable pack; returns the bytes of chunks that were new. */
  async indexPack(projectId: string, packId: string, size: number, entries: PackEntry[]): Promise<number> {
    return this.ds.transaction(async (em) => {
      await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
      const inserted = await rows<{ stored_size: number }>(
        em,
        `INSERT INTO vault_chunks (project_id, hash, pack_id, pack_offset, stored_size, raw_size, compressed)
         SELECT $1, ${hashAt("$3", "c.n")}, $2, c.o, c.s, c.r, c.z FROM unnest(${listOf("$4", "bigint")}, ${listOf("$5", "int")}, ${listOf("$6", "int")}, ${listOf("$7", "bool")}) WITH ORDINALITY AS c(o, s, r, z, n)
         ON CONFLICT (project_id, hash) DO NOTHING RETURNING stored_size`,
        [projectId, packId, packedHashes(entries.map((e) => e.hash)), list(entries.map((e) => e.offset)), list(entries.map((e) => e.stored)), list(entries.map((e) => e.raw)), list(entries.map((e) => e.compressed))],
      );
      return inserted.reduce((n, r) => n + r.stored_size, 0);
    });
  }

  /** Which of `hashes` the project's vault already holds. */
  async existing(projectId: string, hashes: Buffer[]): Promise<Set<string>> {
    if (!hashes.length) return new Set();
    const found = await rows<{ hash: Buffer }>(this.ds, `SELECT hash FROM vault_chunks WHERE project_id = $1 AND hash = ANY(${hashArray("$2")})`, [projectId, packedHashes(hashes)]);
    return new Set(found.map((r) => hex(r.hash)));
  }

  private async locate(projectId: string, hashes: Buffer[]): Promise<Map<string, ChunkLocation>> {
    const found = await rows<ChunkLocation>(
      this.ds,
      `SELECT hash, pack_id, pack_offset, stored_size, raw_size, compressed FROM vault_chunks WHERE project_id = $1 AND hash = ANY(${hashArray("$2")})`,
      [projectId, packedHashes(hashes)],
    );
    return new Map(found.map((r) => [hex(r.hash), r]));
  }

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
    for await (const run of this.readBatches(projectId, [{ hashes }], opts)) if (run.data) yield { hashes: run.hashes, data: run.data };
  }

  /**
   * readRuns over a stream of batches, with reads in flight across their borders:
   * each batch comes first as itself (`data` null), then the runs of its hashes.
   */
  async *readBatches<T extends { hashes: Buffer[] }>(projectId: string, batches: AsyncIterable<T> | Iterable<T>, opts: ReadOptions = {}): AsyncGenerator<{ batch: T; hashes: Buffer[]; data: Buffer | null }> {
    const self = this;
    const steps = async function* () {
      for await (const batch of batches) {
        yield { batch, group: null as ChunkLocation[] | null };
        const unique = [...new Map(batch.hashes.map((h) => [hex(h), h])).values()];
        if (unique.length) for (const group of self.groups(await self.locateAll(projectId, unique))) yield { batch, group };
      }
    };
    yield* mapOrdered(steps(), READS_IN_FLIGHT + 1, async ({ batch, group }) => (group ? { batch, ...(await this.fetch(projectId, group, true, opts)) } : { batch, hashes: [], data: null }));
  }

  private async locateAll(projectId: string, hashes: Buffer[]): Promise<ChunkLocation[]> {
    const locations = await this.locate(projectId, hashes);
    for (const h of hashes) if (!locations.has(hex(h))) throw new ChunkError(hex(h), "missing", "not in the vault index");
    for (const l of locations.values()) if (l.raw_size !== BLOCK_SIZE) throw new ChunkError(hex(l.hash), "corrupt", `its index says ${l.raw_size} bytes, not ${BLOCK_SIZE}`);
    return [...locations.values()].sort((a, b) => (a.pack_id === b.pack_id ? Number(a.pack_offset) - Number(b.pack_offset) : a.pack_id < b.pack_id ? -1 : 1));
  }

  /** Chunks of one pack close to each other, up to RUN_BYTES of them, make one range read. */
  private groups(sorted: ChunkLocation[]): ChunkLocation[][] {
    const out: ChunkLocation[][] = [];
    let i = 0;
    while (i < sorted.length) {
      let j = i + 1;
      const start = Number(sorted[i].pack_offset);
      let end = start + sorted[i].stored_size;
      while (j < sorted.length && sorted[j].pack_id === sorted[i].pack_id && Number(sorted[j].pack_offset) - end < 65536 && j - i < RUN_CHUNKS) {
        end = Math.max(end, Number(sorted[j].pack_offset) + sorted[j].stored_size);
        j++;
      }
      out.push(sorted.slice(i, j));
      i = j;
    }
    return out;
  }

  private async fetch(projectId: string, group: ChunkLocation[], retry: boolean, opts: ReadOptions): Promise<{ hashes: Buffer[]; data: Buffer }> {
    const start = Number(group[0].pack_offset);
    const end = Math.max(...group.map((l) => Number(l.pack_offset) + l.stored_size));
    const buffers = this.codec.buffers;
    const buf = buffers.take(end - start);
    try {
      await this.blobs.readInto(packKey(projectId, group[0].pack_id), start, buf);
    } catch (err) {
      buffers.give(buf);
      if (err instanceof BlobNotFoundError && retry) return this.refetch(projectId, group, opts);
      if (err instanceof BlobNotFoundError) throw new ChunkError(hex(group[0].hash), "missing", `its pack ${err.key.split("/").pop()?.slice(0, 12)}… is gone`);
      if (err instanceof Error && /shorter than/.test(err.message)) throw new ChunkError(hex(group[0].hash), "corrupt", "its pack is truncated");
      throw err;
    }
    try {
      const { data, out } = await this.codec.decode(
        buf,
        group.map((l) => ({ offset: Number(l.pack_offset) - start, stored: l.stored_size, raw: l.raw_size, compressed: l.compressed, hash: l.hash })),
        buffers.take(group.length * BLOCK_SIZE),
        { sha256: opts.sha256 },
      );
      buffers.give(data);
      return { hashes: group.map((l) => l.hash), data: out };
    } catch (err) {
      if (err instanceof DecodeError) {
        const detail = {
          truncated: "its pack is truncated",
          undecompressable: "it does not decompress, or fails its checksum",
          length: "it has the wrong length",
          hash: "its SHA-256 does not match",
        }[err.problem];
        throw new ChunkError(hex(group[err.chunk].hash), "corrupt", detail);
      }
      throw err;
    }
  }

  /** The group's pack is gone (rewritten by garbage collection): find its chunks again and read them where they are now. */
  private async refetch(projectId: string, group: ChunkLocation[], opts: ReadOptions): Promise<{ hashes: Buffer[]; data: Buffer }> {
    const parts: { hashes: Buffer[]; data: Buffer }[] = [];
    for (const g of this.groups(await this.locateAll(projectId, group.map((l) => l.hash)))) parts.push(await this.fetch(projectId, g, false, opts));
    return { hashes: parts.flatMap((p) => p.hashes), data: Buffer.concat(parts.map((p) => p.data)) };
  }

  /**
   * Reclaims space of one project: unindexes chunks that no backup or image
   * references, deletes packs left with no live chunk, rewrites packs that are
   * mostly dead, and deletes pack blobs that were never indexed (a crash between
   * writing and indexing) or never finished (a crash while writing) once older
   * than `graceMs`. One collector per project at a time; safe while backups run,
   * because a backup's blocks reference their chunks from the instant it is taken.
   */
  async collectGarbage(projectId: string, graceMs: number): Promise<{ chunks: number; packs: number; bytes: number } | null> {
    const runner = this.ds.createQueryRunner();
    await runner.connect();
    try {
      const [{ locked }] = await runner.query(`SELECT pg_try_advisory_lock(${0x5707}, hashtext($1)) AS locked`, [`vault:${projectId}`]);
      if (!locked) return null;
      try {
        return await this.collect(projectId, graceMs);
      } finally {
        await runner.query(`SELECT pg_advisory_unlock(${0x5707}, hashtext($1))`, [`vault:${projectId}`]);
      }
    } finally {
      await runner.release();
    }
  }

  private async collect(projectId: string, graceMs: number) {
    const deadChunks = await rows(
      this.ds,
      `DELETE FROM vault_chunks c WHERE c.project_id = $1
         AND NOT EXISTS (SELECT 1 FROM backup_blocks bb JOIN backups b ON b.id = bb.backup_id WHERE bb.hash = c.hash AND b.project_id = c.project_id)
         AND NOT EXISTS (SELECT 1 FROM image_blocks ib JOIN image_disks d ON d.id = ib.image_disk_id JOIN images i ON i.id = d.image_id
                          WHERE ib.hash = c.hash AND i.project_id = c.project_id)
       RETURNING hash`,
      [projectId],
    );
    let packs = 0;
    let bytes = 0;
    const usage = await rows<{ id: string; size_bytes: string; live: string }>(
      this.ds,
      `SELECT p.id, p.size_bytes, coalesce(sum(c.stored_size), 0) AS live
         FROM vault_packs p LEFT JOIN vault_chunks c ON c.pack_id = p.id
        WHERE p.project_id = $1 GROUP BY p.id, p.size_bytes`,
      [projectId],
    );
    const sparse = usage.filter((p) => Number(p.live) > 0 && Number(p.live) < Number(p.size_bytes) * REPACK_BELOW);
    if (sparse.length) await this.repack(projectId, sparse.map((p) => p.id));
    for (const p of usage) {
      if (Number(p.live) > 0 && !sparse.includes(p)) continue;
      const gone = await rows(this.ds, `DELETE FROM vault_packs p WHERE p.id = $1 AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.pack_id = p.id) RETURNING id`, [p.id]);
      if (!gone.length) continue;
      await this.blobs.delete(packKey(projectId, p.id));
      packs++;
      bytes += Number(p.size_bytes);
    }
    const cutoff = Date.now() - graceMs;
    for await (const blob of this.blobs.list(`vault/${projectId}/packs/`)) {
      if (blob.modifiedAt.getTime() > cutoff) continue;
      const id = blob.key.split("/").pop()!;
      const [row] = await rows(this.ds, `SELECT 1 FROM vault_packs WHERE id = $1`, [id]);
      if (row) continue;
      await this.blobs.delete(blob.key);
      packs++;
      bytes += blob.size;
    }
    // Packs a crashed process was still writing.
    const incomplete = await this.blobs.removeIncomplete?.(`vault/${projectId}/packs/`, new Date(cutoff));
    if (incomplete) {
      packs += incomplete.count;
      bytes += incomplete.bytes;
    }
    return { chunks: deadChunks.length, packs, bytes };
  }

  /** Copies the live chunks of `packIds` into new packs, stored form unchanged, and re-points the index. */
  private async repack(projectId: string, packIds: string[]): Promise<void> {
    const live = await rows<ChunkLocation>(
      this.ds,
      `SELECT hash, pack_id, pack_offset, stored_size, raw_size, compressed FROM vault_chunks WHERE project_id = $1 AND pack_id = ANY($2) ORDER BY pack_id, pack_offset`,
      [projectId, packIds],
    );
    let parts: Buffer[] = [];
    let moved: { loc: ChunkLocation; offset: number }[] = [];
    let size = 0;
    const write = async () => {
      if (!moved.length) return;
      const packId = packName(moved.map((m) => ({ hash: m.loc.hash, offset: m.offset, stored: m.loc.stored_size, raw: m.loc.raw_size, compressed: m.loc.compressed })));
      await this.blobs.put(packKey(projectId, packId), parts);
      await this.ds.transaction(async (em) => {
        await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
        await em.query(
          `UPDATE vault_chunks c SET pack_id = $2, pack_offset = m.o
             FROM (SELECT ${hashAt("$3", "u.n")} AS h, u.o FROM unnest(${listOf("$4", "bigint")}) WITH ORDINALITY AS u(o, n)) AS m
            WHERE c.project_id = $1 AND c.hash = m.h`,
          [projectId, packId, packedHashes(moved.map((m) => m.loc.hash)), list(moved.map((m) => m.offset))],
        );
      });
      parts = [];
      moved = [];
      size = 0;
    };
    for (const loc of live) {
      const stored = await this.blobs.getRange(packKey(projectId, loc.pack_id), Number(loc.pack_offset), loc.stored_size);
      // Never carry a damaged chunk into a new pack unnoticed.
      await this.codec.decode(Buffer.from(stored), [{ offset: 0, stored: loc.stored_size, raw: loc.raw_size, compressed: loc.compressed, hash: loc.hash }]).catch((err: unknown) => {
        throw err instanceof DecodeError ? new ChunkError(hex(loc.hash), "corrupt", `found while rewriting its pack (${err.problem})`) : err;
      });
      parts.push(stored);
      moved.push({ loc, offset: size });
      size += stored.length;
      if (size >= PACK_BYTES) await write();
    }
    await write();
  }
}
