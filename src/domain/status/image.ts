import type { Queryable } from "../../db/sql";
import { ImageStatus } from "../../entities";
import type { ErrorCode } from "../errors";
import type { FailureCode } from "../jobs";

/** Every status change of an image. */

/** Its job started: SAVING. */
export async function markSaving(q: Queryable, id: string): Promise<void> {
  await q.query(`UPDATE images SET status = '${ImageStatus.SAVING}', updated_at = now() WHERE id = $1`, [id]);
}

/** ACTIVE, with the stored size of the distinct chunks it references. */
export async function markActive(q: Queryable, id: string, checksum: string | null, extra: { virtualSizeBytes?: number; minDiskBytes?: number } = {}): Promise<void> {
  // Byte counts pass 2^31: every parameter is typed bigint, or Postgres infers int from the literal beside it.
  await q.query(
    `UPDATE images i SET status = '${ImageStatus.ACTIVE}', checksum = $2, updated_at = now(), error_code = NULL, error_message = NULL,
            virtual_size_bytes = coalesce($3::bigint, i.virtual_size_bytes), min_disk_bytes = greatest(i.min_disk_bytes, coalesce($4::bigint, 0)),
            size_bytes = (SELECT coalesce(sum(c.stored_size), 0) FROM vault_chunks c WHERE c.project_id = i.project_id
                           AND c.hash IN (SELECT ib.hash FROM image_blocks ib JOIN image_disks d ON d.id = ib.image_disk_id WHERE d.image_id = i.id))
      WHERE id = $1`,
    [id, checksum, extra.virtualSizeBytes ?? null, extra.minDiskBytes ?? null],
  );
}

/** KILLED with the reason; its blocks go, so their chunks can be reclaimed. Run it in a transaction. */
export async function markKilled(q: Queryable, id: string, code: FailureCode | ErrorCode, message: string): Promise<void> {
  await q.query(`DELETE FROM image_blocks WHERE image_disk_id IN (SELECT id FROM image_disks WHERE image_id = $1)`, [id]);
  await q.query(`UPDATE images SET status = $2, error_code = $3, error_message = $4, updated_at = now() WHERE id = $1`, [id, ImageStatus.KILLED, code, message]);
}
