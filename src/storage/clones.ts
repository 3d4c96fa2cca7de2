import type { EntityManager } from "typeorm";
import { AdvisoryLock } from "../db/locks";
import { rows, type Queryable } from "../db/sql";
import { BLOCK_SIZE } from "../formats/types";

/**
 * Clones: disks made from a backup or an image with no copy. A clone's own blocks
 * (`disk_blocks`, written since) come first; a block it has no row for reads as its
 * source's: a disk backup resolved through its chain of bases, a disk of an image,
 * or a clone manifest (the block list of a source deleted under its clones). The
 * source never changes, so nothing is written per block when a clone is made.
 *
 * The SQL here is composed into the volume store's, the backup's and the restore's
 * statements; every statement that reads a disk's blocks as a whole reads them
 * through `diskView`.
 */

/** The job of project `projectId` hydrating any of these disks, not ended yet, or null: one hydration of a disk at a time, and no restore under one. */
export async function runningHydration(q: Queryable, projectId: string, diskIds: string[]): Promise<string | null> {
  const [job] = await rows<{ id: string }>(
    q,
    `SELECT id FROM jobs WHERE project_id = $1 AND type IN ('CREATE_DISK', 'RESTORE') AND status IN ('QUEUED', 'RUNNING') AND payload->'hydrate' ?| $2::text[] LIMIT 1`,
    [projectId, diskIds],
  );
  return job?.id ?? null;
}

/** Is disk `d` (SQL) a clone? SQL over an alias of disks. */
export const IS_CLONE = (d: string) => `num_nonnulls(${d}.clone_backup_id, ${d}.clone_image_disk_id, ${d}.clone_manifest_id) > 0`;

/**
 * SQL: CTEs `clone_chain` and `src` (disk_id, block_index, hash): the blocks of the
 * sources of the disks `disks` (SQL giving disk ids: a parameter, or a subquery) that
 * hold data, where `inRange(column)` holds; a disk that is not a clone has none.
 * Goes in a `WITH RECURSIVE` list.
 */
export function sourceCtes(disks: string, inRange: (column: string) => string): string {
  return `clone_chain AS (
      SELECT d.id AS disk_id, b.id, b.base_id, 0 AS depth FROM disks d JOIN backups b ON b.id = d.clone_backup_id WHERE d.id IN (${disks})
      UNION ALL
      SELECT c.disk_id, b.id, b.base_id, c.depth + 1 FROM backups b JOIN clone_chain c ON b.id = c.base_id
    ), src AS (
      SELECT x.disk_id, x.block_index, x.hash FROM (
        SELECT DISTINCT ON (c.disk_id, bb.block_index) c.disk_id, bb.block_index, bb.hash FROM backup_blocks bb JOIN clone_chain c ON c.id = bb.backup_id
         WHERE ${inRange("bb.block_index")} ORDER BY c.disk_id, bb.block_index, c.depth
      ) AS x WHERE x.hash IS NOT NULL
      UNION ALL
      SELECT d.id, ib.block_index, ib.hash FROM disks d JOIN image_blocks ib ON ib.image_disk_id = d.clone_image_disk_id WHERE d.id IN (${disks}) AND ${inRange("ib.block_index")}
      UNION ALL
      SELECT d.id, mb.block_index, mb.hash FROM disks d JOIN clone_manifest_blocks mb ON mb.manifest_id = d.clone_manifest_id WHERE d.id IN (${disks}) AND ${inRange("mb.block_index")}
    )`;
}

/** SQL: the rows of `src` (an alias `s`) whose disk has no row of its own for the block: what a clone still reads from its source. */
const UNSHADOWED = `NOT EXISTS (SELECT 1 FROM disk_blocks o WHERE o.disk_id = s.disk_id AND o.block_index = s.block_index)`;

/**
 * SQL: CTEs ending in `view` (block_index, segment_id, segment_offset, hash, version): disk
 * `disk`'s blocks where `inRange` holds as they read: its own rows (a null hash reads as
 * zeros), then the blocks of its source it has no row for (no segment, their hash naming a
 * chunk of the vault, version 0: older than any write). Goes in a `WITH RECURSIVE` list.
 */
export function viewCtes(disk: string, inRange: (column: string) => string): string {
  return `${sourceCtes(disk, inRange)}, view AS (
      SELECT block_index, segment_id, segment_offset, hash, version FROM disk_blocks WHERE disk_id = ${disk} AND ${inRange("block_index")}
      UNION ALL
      SELECT s.block_index, NULL::uuid, NULL::bigint, s.hash, 0::bigint FROM src s WHERE ${UNSHADOWED}
    )`;
}

/**
 * Adds to a capture (a disk's first backup, or an image of a disk) the blocks each clone
 * among its disks still reads from its source, as rows naming their chunk only (no segment:
 * the vault holds them already, so nothing is read or stored again). `captures` is SQL giving
 * rows (owner, disk_id); `table` is backup_blocks or image_blocks and `owner` its column.
 */
export function captureSourceSql(table: "backup_blocks" | "image_blocks", owner: string, captures: string): string {
  return `WITH RECURSIVE cap AS (${captures}), ${sourceCtes("SELECT disk_id FROM cap", everywhere)}
    INSERT INTO ${table} (${owner}, block_index, hash, src_segment, src_offset)
    SELECT cap.owner, s.block_index, s.hash, NULL, NULL FROM src s JOIN cap ON cap.disk_id = s.disk_id WHERE ${UNSHADOWED}`;
}

export const between = (first: string, last: string) => (column: string) => `${column} BETWEEN ${first} AND ${last}`;
export const everywhere = () => "true";

/** SQL: rows (block_index, hash) of the blocks a clone still reads from its source: `src` without the blocks it has rows for. */
const STILL_SOURCED = `SELECT s.block_index, s.hash FROM src s WHERE ${UNSHADOWED}`;

/** The bytes holding data of each image disk (its blocks named by chunks), in order: what a clone of it uses. */
export async function imageDataBytes(q: Queryable, imageDiskIds: string[]): Promise<number[]> {
  const found = await rows<{ id: string; n: string }>(q, `SELECT image_disk_id AS id, count(*) AS n FROM image_blocks WHERE image_disk_id = ANY($1) GROUP BY 1`, [imageDiskIds]);
  const by = new Map(found.map((r) => [r.id, Number(r.n) * BLOCK_SIZE]));
  return imageDiskIds.map((id) => by.get(id) ?? 0);
}

/** How much of a disk's data still lives in the vault (its source's blocks it has not written or hydrated), and how much in its own blocks. */
export async function hydrationOf(q: Queryable, diskId: string): Promise<{ bytesInVault: number; bytesLocal: number }> {
  const [r] = await rows<{ vault: string; local: string }>(
    q,
    `WITH RECURSIVE ${sourceCtes("$1", everywhere)}
     SELECT (SELECT count(*) FROM (${STILL_SOURCED}) AS v) AS vault,
            (SELECT count(*) FROM disk_blocks WHERE disk_id = $1 AND segment_id IS NOT NULL) AS local`,
    [diskId],
  );
  return { bytesInVault: Number(r.vault) * BLOCK_SIZE, bytesLocal: Number(r.local) * BLOCK_SIZE };
}

/** The blocks of [first, last] of clone `diskId` still read from its source, ascending, with their hashes. */
export async function stillSourced(q: Queryable, diskId: string, first: number, last: number): Promise<{ index: number; hash: Buffer }[]> {
  const found = await rows<{ block_index: string; hash: Buffer }>(q, `WITH RECURSIVE ${sourceCtes("$1", between("$2", "$3"))} ${STILL_SOURCED} ORDER BY 1`, [diskId, first, last]);
  return found.map((r) => ({ index: Number(r.block_index), hash: r.hash }));
}

/**
 * The ranges [first, last] of clone `diskId`'s block indexes that together hold every
 * block it still reads from its source, each holding at most `size` of them: a walk
 * over them costs what the source's data costs, never what the disk's size does.
 */
export async function sourcedRanges(q: Queryable, diskId: string, size: number): Promise<[number, number][]> {
  const found = await rows<{ first: string; last: string }>(
    q,
    `WITH RECURSIVE ${sourceCtes("$1", everywhere)}
     SELECT min(block_index) AS first, max(block_index) AS last FROM (
       SELECT block_index, row_number() OVER (ORDER BY block_index) - 1 AS rn FROM (${STILL_SOURCED}) AS v
     ) AS t GROUP BY rn / $2 ORDER BY 1`,
    [diskId, size],
  );
  return found.map((r) => [Number(r.first), Number(r.last)]);
}

/**
 * Keeps every clone of the disk backups `backupIds` or of the image disks `imageDiskIds`
 * whole when they are deleted, in the caller's transaction (before the rows go): each
 * source's block list is copied once, as hashes, into a clone manifest, and its clones
 * read from that instead. The work grows with the source's blocks, never with its clones.
 */
export async function detachClones(em: EntityManager, sources: { backupIds?: string[]; imageDiskIds?: string[] }): Promise<number> {
  const clones = await rows<{ source: string; project_id: string; kind: "backup" | "image" }>(
    em,
    `SELECT DISTINCT clone_backup_id AS source, project_id, 'backup' AS kind FROM disks WHERE clone_backup_id = ANY($1::uuid[])
     UNION SELECT DISTINCT clone_image_disk_id, project_id, 'image' FROM disks WHERE clone_image_disk_id = ANY($2::uuid[])`,
    [sources.backupIds ?? [], sources.imageDiskIds ?? []],
  );
  for (const c of clones) {
    const [m] = await rows<{ id: string }>(em, `INSERT INTO clone_manifests (project_id) VALUES ($1) RETURNING id`, [c.project_id]);
    if (c.kind === "backup") {
      await em.query(
        `WITH RECURSIVE chain AS (
           SELECT id, base_id, 0 AS depth FROM backups WHERE id = $1
           UNION ALL
           SELECT b.id, b.base_id, c.depth + 1 FROM backups b JOIN chain c ON b.id = c.base_id
         )
         INSERT INTO clone_manifest_blocks (manifest_id, block_index, hash)
         SELECT $2, x.block_index, x.hash FROM (
           SELECT DISTINCT ON (bb.block_index) bb.block_index, bb.hash FROM backup_blocks bb JOIN chain c ON c.id = bb.backup_id ORDER BY bb.block_index, c.depth
         ) AS x WHERE x.hash IS NOT NULL`,
        [c.source, m.id],
      );
      await em.query(`UPDATE disks SET clone_backup_id = NULL, clone_manifest_id = $2 WHERE clone_backup_id = $1`, [c.source, m.id]);
    } else {
      await em.query(`INSERT INTO clone_manifest_blocks (manifest_id, block_index, hash) SELECT $2, block_index, hash FROM image_blocks WHERE image_disk_id = $1`, [c.source, m.id]);
      await em.query(`UPDATE disks SET clone_image_id = NULL, clone_image_disk_id = NULL, clone_manifest_id = $2 WHERE clone_image_disk_id = $1`, [c.source, m.id]);
    }
  }
  return clones.length;
}

/**
 * Takes the disk's write lock until the transaction ends (again, if it holds it already):
 * a write's commit sees the disk's blocks either before or after what the transaction does.
 * Writers take it before they touch the disk's row; so must whoever takes both.
 */
export async function lockDisk(em: EntityManager, diskId: string): Promise<void> {
  await em.query(`SELECT pg_advisory_xact_lock(${AdvisoryLock.DISK}, hashtext($1))`, [diskId]);
}

/**
 * Makes a disk read exactly as disk backup `backup` at once, in the caller's transaction
 * (restoreBackup): the disk becomes the backup's clone and keeps only its own blocks that
 * hold what the backup holds there (compared by hash, looked up through the backup's chain
 * of bases); the rest read from the vault until written or hydrated. Nothing is copied:
 * the work grows with the blocks the disk holds, not with its size or the backup's. Its
 * next backup takes no base from before this (`backup_floor`: its change tracking no longer
 * says what changed since them); its NBD journal is dropped and its restores counted, so
 * NBD writes made to the bytes this replaces are refused.
 */
export async function restoreAsClone(em: EntityManager, diskId: string, backup: { id: string; sizeBytes: number }): Promise<void> {
  await lockDisk(em, diskId);
  await em.query(
    `WITH RECURSIVE chain AS (
       SELECT id, base_id, 0 AS depth FROM backups WHERE id = $2
       UNION ALL
       SELECT b.id, b.base_id, c.depth + 1 FROM backups b JOIN chain c ON b.id = c.base_id
     )
     DELETE FROM disk_blocks d WHERE d.disk_id = $1
        AND d.hash IS DISTINCT FROM (SELECT bb.hash FROM backup_blocks bb JOIN chain c ON c.id = bb.backup_id WHERE bb.block_index = d.block_index ORDER BY c.depth LIMIT 1)`,
    [diskId, backup.id],
  );
  await em.query(`DELETE FROM nbd_journal WHERE disk_id = $1`, [diskId]);
  await em.query(
    `UPDATE disks SET clone_backup_id = $2, clone_image_id = NULL, clone_image_disk_id = NULL, clone_manifest_id = NULL, used_bytes = $3,
            write_version = write_version + 1, backup_floor = write_version + 1, restores = restores + 1, updated_at = now()
      WHERE id = $1`,
    [diskId, backup.id, backup.sizeBytes],
  );
}
