import type { DataSource } from "typeorm";
import { AdvisoryLock } from "../../db/locks";
import { rows } from "../../db/sql";
import type { BlobStore } from "../blob-store";
import { DecodeError, type ChunkCodec } from "../codec";
import { INDEXED_OR_PENDING, pendingUnder } from "../pending-blobs";
import { ChunkError, hex, packKey } from "./chunk";
import type { PackWriter } from "./pack-writer";

/** A pack whose live chunks fill less than this share of it is rewritten by garbage collection. */
const REPACK_BELOW = 0.5;
/** Chunks a rewrite hands the pack writer at once (one gathered write). */
const REPACK_CHUNKS = 64;

/** SQL: no backup, image or clone manifest (the block list of a source deleted under its clones) of its project references chunk `c` (an alias of vault_chunks). */
const CHUNK_UNREFERENCED = (c: string) =>
  `NOT EXISTS (SELECT 1 FROM backup_blocks bb JOIN backups b ON b.id = bb.backup_id WHERE bb.hash = ${c}.hash AND b.project_id = ${c}.project_id)
   AND NOT EXISTS (SELECT 1 FROM image_blocks ib JOIN image_disks d ON d.id = ib.image_disk_id JOIN images i ON i.id = d.image_id
                    WHERE ib.hash = ${c}.hash AND i.project_id = ${c}.project_id)
   AND NOT EXISTS (SELECT 1 FROM clone_manifest_blocks mb JOIN clone_manifests m ON m.id = mb.manifest_id
                    WHERE mb.hash = ${c}.hash AND m.project_id = ${c}.project_id)`;

interface ChunkLocation {
  hash: Buffer;
  pack_id: string;
  pack_offset: string;
  stored_size: number;
  raw_size: number;
  compressed: boolean;
}

export interface Reclaimed {
  chunks: number;
  packs: number;
  bytes: number;
}

/**
 * Reclaims the vault's space: chunks nothing references, the packs they leave
 * empty or mostly dead, and blobs a crash left behind. Mostly-dead packs are
 * rewritten through the same PackWriter backups write with (`rewriter`, which
 * repoints the index instead of adding to it).
 */
export class GarbageCollector {
  constructor(
    private readonly ds: DataSource,
    private readonly blobs: BlobStore,
    private readonly codec: ChunkCodec,
    private readonly rewriter: (projectId: string) => PackWriter,
  ) {}

  /**
   * Reclaims space of one project: unindexes chunks that no backup or image
   * references, deletes packs left with no live chunk, rewrites packs that are
   * mostly dead, and deletes pack blobs that were never indexed (a crash between
   * writing and indexing) or never finished (a crash while writing) once older
   * than `graceMs`. One collector per project at a time; safe while backups run,
   * because a backup's blocks reference their chunks from the instant it is taken.
   */
  async collectGarbage(projectId: string, graceMs: number): Promise<Reclaimed | null> {
    return this.asCollector(projectId, () => this.collect(projectId, graceMs));
  }

  /**
   * Reclaims promptly what a job that failed or was cancelled wrote, given when
   * it ran: chunks of the project's packs indexed between `from` and `to` that
   * nothing references (its own rows are gone with its cleanup), and the packs
   * that leaves empty. A pack some of whose chunks are referenced stays for
   * collectGarbage. A running job's packs are safe: it references every chunk
   * it relies on from the moment it starts (its captured or imported blocks),
   * and a pack is indexed only once durable. Null when a collector runs.
   */
  async dropUnreferencedPacks(projectId: string, from: Date, to: Date): Promise<Reclaimed | null> {
    return this.asCollector(projectId, async () => {
      const chunks = await rows(
        this.ds,
        `DELETE FROM vault_chunks c USING vault_packs p
          WHERE p.project_id = $1 AND p.created_at BETWEEN $2 AND $3 AND c.project_id = $1 AND c.pack_id = p.id AND ${CHUNK_UNREFERENCED("c")}
          RETURNING c.hash`,
        [projectId, from, to],
      );
      const packs = await rows<{ id: string; size_bytes: string }>(
        this.ds,
        `DELETE FROM vault_packs p WHERE p.project_id = $1 AND p.created_at BETWEEN $2 AND $3
            AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.pack_id = p.id) RETURNING id, size_bytes`,
        [projectId, from, to],
      );
      let bytes = 0;
      for (const p of packs) {
        await this.blobs.delete(packKey(projectId, p.id));
        bytes += Number(p.size_bytes);
      }
      return { chunks: chunks.length, packs: packs.length, bytes };
    });
  }

  /** Runs `fn` as the project's one collector (across processes), or returns null when another is. */
  private async asCollector<T>(projectId: string, fn: () => Promise<T>): Promise<T | null> {
    const runner = this.ds.createQueryRunner();
    await runner.connect();
    try {
      const [{ locked }] = await runner.query(`SELECT pg_try_advisory_lock(${AdvisoryLock.VAULT}, hashtext($1)) AS locked`, [`vault:${projectId}`]);
      if (!locked) return null;
      try {
        return await fn();
      } finally {
        await runner.query(`SELECT pg_advisory_unlock(${AdvisoryLock.VAULT}, hashtext($1))`, [`vault:${projectId}`]);
      }
    } finally {
      await runner.release();
    }
  }

  private async collect(projectId: string, graceMs: number): Promise<Reclaimed> {
    // Block lists kept for clones that are gone, or no longer read from them (hydrated).
    await this.ds.query(`DELETE FROM clone_manifests m WHERE m.project_id = $1 AND NOT EXISTS (SELECT 1 FROM disks d WHERE d.clone_manifest_id = m.id)`, [projectId]);
    const deadChunks = await rows(this.ds, `DELETE FROM vault_chunks c WHERE c.project_id = $1 AND ${CHUNK_UNREFERENCED("c")} RETURNING hash`, [projectId]);
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
    if (sparse.length)
      await this.repack(
        projectId,
        sparse.map((p) => p.id),
      );
    for (const p of usage) {
      if (Number(p.live) > 0 && !sparse.includes(p)) continue;
      const gone = await rows(this.ds, `DELETE FROM vault_packs p WHERE p.id = $1 AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.pack_id = p.id) RETURNING id`, [p.id]);
      if (!gone.length) continue;
      await this.blobs.delete(packKey(projectId, p.id));
      packs++;
      bytes += Number(p.size_bytes);
    }
    const cutoff = Date.now() - graceMs;
    // Packs being written or waiting for their index are pending: neither their files nor their blobs go.
    const pending = await pendingUnder(this.ds, `vault/${projectId}/packs/`, graceMs);
    for await (const blob of this.blobs.list(`vault/${projectId}/packs/`)) {
      if (blob.modifiedAt.getTime() > cutoff) continue;
      const id = blob.key.split("/").pop()!;
      const [row] = await rows(this.ds, INDEXED_OR_PENDING(`SELECT 1 FROM vault_packs WHERE id = $1`, "$2"), [id, blob.key]);
      if (row) continue;
      await this.blobs.delete(blob.key);
      packs++;
      bytes += blob.size;
    }
    // Packs a crashed process was still writing.
    const incomplete = await this.blobs.removeIncomplete?.(`vault/${projectId}/packs/`, new Date(cutoff), (key) => pending.has(key));
    if (incomplete) {
      packs += incomplete.count;
      bytes += incomplete.bytes;
    }
    return { chunks: deadChunks.length, packs, bytes };
  }

  /** Copies the live chunks of `packIds` into new packs, stored form unchanged, and repoints the index as each new pack is durable. */
  private async repack(projectId: string, packIds: string[]): Promise<void> {
    const live = await rows<ChunkLocation>(
      this.ds,
      `SELECT hash, pack_id, pack_offset, stored_size, raw_size, compressed FROM vault_chunks WHERE project_id = $1 AND pack_id = ANY($2) ORDER BY pack_id, pack_offset`,
      [projectId, packIds],
    );
    const writer = this.rewriter(projectId);
    try {
      let batch: { hash: Buffer; stored: Buffer; raw: number; compressed: boolean }[] = [];
      for (const loc of live) {
        const stored = await this.blobs.getRange(packKey(projectId, loc.pack_id), Number(loc.pack_offset), loc.stored_size);
        // Never carry a damaged chunk into a new pack unnoticed.
        await this.codec.decode(Buffer.from(stored), [{ offset: 0, stored: loc.stored_size, raw: loc.raw_size, compressed: loc.compressed, hash: loc.hash }]).catch((err: unknown) => {
          throw err instanceof DecodeError ? new ChunkError(hex(loc.hash), "corrupt", `found while rewriting its pack (${err.problem})`) : err;
        });
        batch.push({ hash: loc.hash, stored, raw: loc.raw_size, compressed: loc.compressed });
        if (batch.length >= REPACK_CHUNKS) {
          await writer.addStored(batch);
          batch = [];
        }
      }
      await writer.addStored(batch);
      await writer.flush();
    } catch (err) {
      await writer.abort();
      throw err;
    }
  }
}
