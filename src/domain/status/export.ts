import { rows, type Queryable } from "../../db/sql";
import { ExportStatus } from "../../entities";
import type { ErrorCode } from "../errors";
import type { FailureCode } from "../jobs";

/** Every status change of an image export. */

/** Its job started writing the file: RUNNING. */
export async function markRunning(q: Queryable, id: string): Promise<void> {
  await q.query(`UPDATE image_exports SET status = '${ExportStatus.RUNNING}' WHERE id = $1`, [id]);
}

/** The file is durable: READY until `ttlSeconds` from now. */
export async function markReady(q: Queryable, id: string, file: { sizeBytes: number; sha256: string | null }, ttlSeconds: number): Promise<void> {
  await q.query(`UPDATE image_exports SET status = '${ExportStatus.READY}', size_bytes = $2, sha256 = $3, expires_at = now() + make_interval(secs => $4) WHERE id = $1`, [
    id,
    file.sizeBytes,
    file.sha256,
    ttlSeconds,
  ]);
}

/** Its job failed or was cancelled: FAILED with the reason. */
export async function markFailed(q: Queryable, id: string, code: FailureCode | ErrorCode, message: string): Promise<void> {
  await q.query(`UPDATE image_exports SET status = '${ExportStatus.FAILED}', error_code = $2, error_message = $3 WHERE id = $1`, [id, code, message]);
}

/** READY exports past their time become EXPIRED; returns them, so their files can go. */
export async function expireDue(q: Queryable): Promise<{ id: string; project_id: string }[]> {
  return rows(q, `UPDATE image_exports SET status = '${ExportStatus.EXPIRED}' WHERE status = '${ExportStatus.READY}' AND expires_at < now() RETURNING id, project_id`);
}
