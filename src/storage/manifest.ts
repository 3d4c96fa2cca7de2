import type { EntityManager } from "typeorm";
import type { Queryable } from "../db/sql";
import { rows } from "../db/sql";
import { DiskType, type Backup } from "../entities";
import { sourceCtes } from "./clones";

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
const MANIFEST = `WITH RECURSIVE chain AS (
    SELECT id, base_id, 0 AS depth FROM backups WHERE id = $1
    UNION ALL
    SELECT b.id, b.base_id, c.depth + 1 FROM backups b JOIN chain c ON b.id = c.base_id
  ), m AS (
    SELECT DISTINCT ON (bb.block_index) bb.block_index, bb.hash
      FROM backup_blocks bb JOIN chain c ON c.id = bb.backup_id
     WHERE bb.block_index BETWEEN $2 AND $3
     ORDER BY bb.block_index, c.depth
  )`;

/** SQL: the blocks of each disk backup in $1 (an array), resolved through its chain, as `m` (top, block_index, hash). */
const MANIFESTS = `WITH RECURSIVE chain AS (
    SELECT id AS top, id, base_id, 0 AS depth FROM backups WHERE id = ANY($1)
    UNION ALL
    SELECT c.top, b.id, b.base_id, c.depth + 1 FROM backups b JOIN chain c ON b.id = c.base_id
  ), m AS (
    SELECT DISTINCT ON (c.top, bb.block_index) c.top, bb.block_index, bb.hash
      FROM backup_blocks bb JOIN chain c ON c.id = bb.backup_id
     ORDER BY c.top, bb.block_index, c.depth
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

/** The blocks holding data of the disk backups `backupIds` together, each resolved through its chain. */
export async function countRecordedBlocks(q: Queryable, backupIds: string[]): Promise<number> {
  const [{ n }] = await rows<{ n: string }>(q, `${MANIFESTS} SELECT count(*) AS n FROM m WHERE hash IS NOT NULL`, [backupIds]);
  return Number(n);
}

/** Where a disk's bytes come from: a disk backup (through its chain) or a disk of an image. */
export interface BlockSource {
  backupId?: string;
  imageDiskId?: string;
}

/**
 * SQL: what the blocks [$2, $3] of `source` ($1, the backup or the image disk)
 * read as, as the CTE `m` (block_index, hash; a null hash reads as zeros). For
 * the statements of the storage layer that join a manifest to their own tables
 * (a restore's plan); no caller outside it composes SQL with it.
 */
export function manifestOf(source: BlockSource): string {
  return source.imageDiskId ? `WITH RECURSIVE m AS (SELECT block_index, hash FROM image_blocks WHERE image_disk_id = $1 AND block_index BETWEEN $2 AND $3)` : MANIFEST;
}

/**
 * The blocks of [first, last] of `source` that hold data, ascending, each with the
 * SHA-256 naming its chunk: the block list of a backup or an image read as it is.
 */
export async function sourceBlocks(q: Queryable, source: BlockSource, first: number, last: number): Promise<{ index: number; hash: Buffer }[]> {
  const found = await rows<{ i: string; h: Buffer }>(q, `${manifestOf(source)} SELECT block_index AS i, hash AS h FROM m WHERE hash IS NOT NULL ORDER BY block_index`, [
    source.imageDiskId ?? source.backupId,
    first,
    last,
  ]);
  return found.map((r) => ({ index: Number(r.i), hash: r.h }));
}

/**
 * The ranges [first, last] of block indexes that together hold every block the
 * source records (and every block disk `diskId` holds data in, when given), each
 * holding at most `size` of them (`firstSize` for the first one); ranges where
 * nothing is recorded are left out. A walk over these ranges costs what the data
 * costs, never what the disk's size does: a 1 TiB disk holding 8 MiB is two
 * ranges, not 4,096.
 */
export async function dataRanges(q: Queryable, source: BlockSource, opts: { diskId?: string; size?: number; firstSize?: number } = {}): Promise<[number, number][]> {
  const size = opts.size ?? MANIFEST_BATCH;
  const firstSize = opts.firstSize ?? size;
  const recorded = source.imageDiskId ? `SELECT block_index FROM image_blocks WHERE image_disk_id = $1` : `SELECT bb.block_index FROM backup_blocks bb WHERE bb.backup_id IN (SELECT id FROM chain)`;
  const ctes = [
    ...(source.imageDiskId
      ? []
      : [
          `chain AS (
         SELECT id, base_id FROM backups WHERE id = $1
         UNION ALL
         SELECT b.id, b.base_id FROM backups b JOIN chain c ON b.id = c.base_id
       )`,
        ]),
    ...(opts.diskId ? [sourceCtes("$4", () => "true")] : []),
  ];
  const chain = ctes.length ? `WITH RECURSIVE ${ctes.join(", ")}` : "";
  // The disk's own blocks holding data, and (a clone's) those it reads from its source.
  const own = opts.diskId ? `UNION SELECT block_index FROM disk_blocks WHERE disk_id = $4 AND hash IS NOT NULL UNION SELECT block_index FROM src` : "";
  const found = await rows<{ first: string; last: string }>(
    q,
    `${chain}
     SELECT min(block_index) AS first, max(block_index) AS last FROM (
       SELECT block_index, row_number() OVER (ORDER BY block_index) - 1 AS rn FROM (${recorded} ${own}) AS idx
     ) AS t
     GROUP BY CASE WHEN rn < $2 THEN -1 ELSE (rn - $2) / $3 END
     ORDER BY 1`,
    [source.imageDiskId ?? source.backupId, firstSize, size, ...(opts.diskId ? [opts.diskId] : [])],
  );
  return found.map((r) => [Number(r.first), Number(r.last)]);
}

/**
 * One image disk of image `imageId` per disk backup, its blocks resolved through
 * the backup's chain (MANIFEST over every block): no data is copied, chunks are shared.
 */
export async function addImageDisksFromBackup(em: EntityManager, imageId: string, parts: Backup[]): Promise<void> {
  for (const [i, part] of parts.entries()) {
    const [disk] = await rows<{ id: string }>(em, `INSERT INTO image_disks (image_id, disk_index, device, disk_type, size_bytes) VALUES ($1, $2, $3, $4, $5) RETURNING id`, [
      imageId,
      i,
      part.device,
      part.diskType ?? DiskType.DATA,
      part.diskSizeBytes ?? 2 ** 20,
    ]);
    await em.query(`${MANIFEST} INSERT INTO image_blocks (image_disk_id, block_index, hash) SELECT $4, block_index, hash FROM m WHERE hash IS NOT NULL`, [
      part.id,
      0,
      Number.MAX_SAFE_INTEGER,
      disk.id,
    ]);
  }
}
