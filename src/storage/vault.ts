import crypto from "node:crypto";
import type { DataSource } from "typeorm";
import { decompress } from "zstd-napi";
import { CompressionPool } from "./compression";
import { rows } from "../db/sql";
import { BlobNotFoundError, type BlobStore } from "./blob-store";

/** Packs are written once they reach this size. */
export const PACK_BYTES = 16 * 1024 * 1024;
/** A pack whose live chunks fill less than this share of it is rewritten by garbage collection. */
const REPACK_BELOW = 0.5;

export const packKey = (projectId: string, packId: string) => `vault/${projectId}/packs/${packId.slice(0, 2)}/${packId}`;
export const hex = (hash: Buffer) => hash.toString("hex");

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
 * Collects new chunks of one project into packs: each chunk is compressed with
 * zstd (kept raw when that does not help), appended to the pack in memory, and
 * the pack is written as one blob. Only after the blob is durable does one
 * transaction index its chunks, so an indexed chunk always has its bytes.
 */
export class PackWriter {
  private parts: Buffer[] = [];
  private size = 0;
  private entries: PackEntry[] = [];
  private pending = new Set<string>();
  /** Bytes this writer added to the vault. */
  storedBytes = 0;

  constructor(
    private readonly vault: Vault,
    private readonly projectId: string,
  ) {}

  has(hash: Buffer): boolean {
    return this.pending.has(hex(hash));
  }

  async add(hash: Buffer, raw: Buffer): Promise<void> {
    await this.addMany([{ hash, raw }]);
  }

  /** Adds chunks, compressing them together on the vault's worker pool. */
  async addMany(chunks: { hash: Buffer; raw: Buffer }[]): Promise<void> {
    const fresh: { hash: Buffer; raw: Buffer }[] = [];
    for (const c of chunks) {
      const key = hex(c.hash);
      if (this.pending.has(key)) continue;
      this.pending.add(key);
      fresh.push(c);
    }
    if (!fresh.length) return;
    const packed = await this.vault.compression.compress(fresh.map((c) => c.raw));
    for (let i = 0; i < fresh.length; i++) {
      const { hash, raw } = fresh[i];
      const compressed = packed[i].length < raw.length;
      // A chunk cut from a larger read buffer is copied, so the pack does not pin that buffer.
      const stored = compressed ? packed[i] : raw.byteLength === raw.buffer.byteLength ? raw : Buffer.from(raw);
      this.parts.push(stored);
      this.entries.push({ hash, offset: this.size, stored: stored.length, raw: raw.length, compressed });
      this.size += stored.length;
      if (this.size >= PACK_BYTES) await this.flush();
    }
  }

  async flush(): Promise<void> {
    if (!this.entries.length) return;
    const parts = this.parts;
    const entries = this.entries;
    this.parts = [];
    this.entries = [];
    this.size = 0;
    this.pending.clear();
    this.storedBytes += await this.vault.writePack(this.projectId, parts, entries);
  }
}

interface PackEntry {
  hash: Buffer;
  offset: number;
  stored: number;
  raw: number;
  compressed: boolean;
}

/** A pack is named by the SHA-256 of its index (each chunk's hash, place and form), which names its content. */
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
    readonly compression: CompressionPool = new CompressionPool(1, 0),
  ) {}

  writer(projectId: string): PackWriter {
    return new PackWriter(this, projectId);
  }

  /** Writes a pack and indexes its chunks; returns the bytes of chunks that were new. */
  async writePack(projectId: string, parts: Buffer[], entries: PackEntry[]): Promise<number> {
    const packId = packName(entries);
    const size = parts.reduce((n, p) => n + p.length, 0);
    await this.blobs.put(packKey(projectId, packId), parts);
    return this.ds.transaction(async (em) => {
      await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
      const inserted = await rows<{ stored_size: number }>(
        em,
        `INSERT INTO vault_chunks (project_id, hash, pack_id, pack_offset, stored_size, raw_size, compressed)
         SELECT $1, c.h, $2, c.o, c.s, c.r, c.z FROM unnest($3::bytea[], $4::bigint[], $5::int[], $6::int[], $7::bool[]) AS c(h, o, s, r, z)
         ON CONFLICT (project_id, hash) DO NOTHING RETURNING stored_size`,
        [projectId, packId, entries.map((e) => e.hash), entries.map((e) => e.offset), entries.map((e) => e.stored), entries.map((e) => e.raw), entries.map((e) => e.compressed)],
      );
      return inserted.reduce((n, r) => n + r.stored_size, 0);
    });
  }

  /** Which of `hashes` the project's vault already holds. */
  async existing(projectId: string, hashes: Buffer[]): Promise<Set<string>> {
    if (!hashes.length) return new Set();
    const found = await rows<{ hash: Buffer }>(this.ds, `SELECT hash FROM vault_chunks WHERE project_id = $1 AND hash = ANY($2::bytea[])`, [projectId, hashes]);
    return new Set(found.map((r) => hex(r.hash)));
  }

  private async locate(projectId: string, hashes: Buffer[]): Promise<Map<string, ChunkLocation>> {
    const found = await rows<ChunkLocation>(
      this.ds,
      `SELECT hash, pack_id, pack_offset, stored_size, raw_size, compressed FROM vault_chunks WHERE project_id = $1 AND hash = ANY($2::bytea[])`,
      [projectId, hashes],
    );
    return new Map(found.map((r) => [hex(r.hash), r]));
  }

  /**
   * Reads and checks chunks: each is decompressed and its SHA-256 compared with its
   * name. Adjacent chunks of a pack are read with one range read. A pack that
   * garbage collection rewrote meanwhile is looked up again once.
   */
  async readChunks(projectId: string, hashes: Buffer[]): Promise<Map<string, Buffer>> {
    const unique = [...new Map(hashes.map((h) => [hex(h), h])).values()];
    const out = new Map<string, Buffer>();
    for (let attempt = 0; ; attempt++) {
      const wanted = unique.filter((h) => !out.has(hex(h)));
      if (!wanted.length) return out;
      const locations = await this.locate(projectId, wanted);
      for (const h of wanted) if (!locations.has(hex(h))) throw new ChunkError(hex(h), "missing", "not in the vault index");
      const sorted = [...locations.values()].sort((a, b) => (a.pack_id === b.pack_id ? Number(a.pack_offset) - Number(b.pack_offset) : a.pack_id < b.pack_id ? -1 : 1));
      try {
        let i = 0;
        while (i < sorted.length) {
          let j = i + 1;
          const start = Number(sorted[i].pack_offset);
          let end = start + sorted[i].stored_size;
          while (j < sorted.length && sorted[j].pack_id === sorted[i].pack_id && Number(sorted[j].pack_offset) - end < 65536 && end - start < 8 * 1024 * 1024) {
            end = Math.max(end, Number(sorted[j].pack_offset) + sorted[j].stored_size);
            j++;
          }
          const buf = await this.blobs.getRange(packKey(projectId, sorted[i].pack_id), start, end - start);
          for (let k = i; k < j; k++) {
            const loc = sorted[k];
            const off = Number(loc.pack_offset) - start;
            out.set(hex(loc.hash), this.decode(loc, buf.subarray(off, off + loc.stored_size)));
          }
          i = j;
        }
      } catch (err) {
        if (err instanceof BlobNotFoundError && attempt === 0) continue;
        if (err instanceof BlobNotFoundError) throw new ChunkError(hex(sorted[0].hash), "missing", `its pack ${err.key.split("/").pop()?.slice(0, 12)}… is gone`);
        if (err instanceof Error && /shorter than/.test(err.message)) throw new ChunkError(hex(sorted[0].hash), "corrupt", "its pack is truncated");
        throw err;
      }
    }
  }

  private decode(loc: ChunkLocation, stored: Buffer): Buffer {
    let raw: Buffer;
    try {
      raw = loc.compressed ? decompress(stored) : Buffer.from(stored);
    } catch {
      throw new ChunkError(hex(loc.hash), "corrupt", "it does not decompress");
    }
    if (raw.length !== loc.raw_size || !crypto.createHash("sha256").update(raw).digest().equals(loc.hash)) {
      throw new ChunkError(hex(loc.hash), "corrupt", "its SHA-256 does not match");
    }
    return raw;
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
          `UPDATE vault_chunks c SET pack_id = $2, pack_offset = m.o FROM unnest($3::bytea[], $4::bigint[]) AS m(h, o) WHERE c.project_id = $1 AND c.hash = m.h`,
          [projectId, packId, moved.map((m) => m.loc.hash), moved.map((m) => m.offset)],
        );
      });
      parts = [];
      moved = [];
      size = 0;
    };
    for (const loc of live) {
      const stored = await this.blobs.getRange(packKey(projectId, loc.pack_id), Number(loc.pack_offset), loc.stored_size);
      this.decode(loc, stored); // never carry a damaged chunk into a new pack unnoticed
      parts.push(stored);
      moved.push({ loc, offset: size });
      size += stored.length;
      if (size >= PACK_BYTES) await write();
    }
    await write();
  }
}
