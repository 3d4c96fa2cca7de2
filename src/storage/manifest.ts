import type { Queryable } from "../db/sql";
import { rows } from "../db/sql";

/** Block indexes read per statement when walking a whole disk. */
export const MANIFEST_BATCH = 4096;

export interface ManifestEntry {
  index: number;
  /** SHA-256 of the block; null when the block reads as zeros. */
  hash: Buffer | null;
}

/**
 * SQL: the manifest of backup $1 over blocks [$2, $3] as the table `m` (block_index,
 * hash): each block from the nearest backup in its chain of bases that recorded it.
 */
export const MANIFEST = `WITH RECURSIVE chain AS (
    SELECT id, base_id, 0 AS depth FROM backups WHERE id = $1
    UNION ALL
    SELECT b.id, b.base_id, c.depth + 1 FROM backups b JOIN chain c ON b.id = c.base_id
  ), m AS (
    SELECT DISTINCT ON (bb.block_index) bb.block_index, bb.hash
      FROM backup_blocks bb JOIN chain c ON c.id = bb.backup_id
     WHERE bb.block_index BETWEEN $2 AND $3
     ORDER BY bb.block_index, c.depth
  )`;

/**
 * The blocks of a disk backup in [first, last], resolved through its chain of
 * bases: each block comes from the nearest backup in the chain that recorded it.
 * Blocks no backup recorded read as zeros and are not returned.
 */
export async function resolveManifest(q: Queryable, backupId: string, first: number, last: number): Promise<ManifestEntry[]> {
  const found = await rows<{ block_index: string; hash: Buffer | null }>(q, `${MANIFEST} SELECT block_index, hash FROM m ORDER BY block_index`, [backupId, first, last]);
  return found.map((r) => ({ index: Number(r.block_index), hash: r.hash }));
}

/** Walks a whole disk backup's manifest in batches, memory bounded by the batch. */
export async function* walkManifest(q: Queryable, backupId: string, blockCount: number): AsyncIterable<ManifestEntry[]> {
  for (let first = 0; first < blockCount; first += MANIFEST_BATCH) {
    yield await resolveManifest(q, backupId, first, Math.min(blockCount, first + MANIFEST_BATCH) - 1);
  }
}
