import { rows, type Queryable } from "../../db/sql";
import { BackupResourceType, BackupStatus, ImageStatus, ImageType } from "../../entities";
import type { ErrorCode } from "../errors";
import { FailureCode } from "../jobs";

/**
 * Every status change of a backup. A server backup's disk backups (its children)
 * change with it where the statement names `(id = $1 OR parent_id = $1)`.
 */

/** A backup and its children are being deleted: DELETING until the job has removed them. */
export async function markDeleting(q: Queryable, id: string): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.DELETING}', updated_at = now() WHERE id = $1 OR parent_id = $1`, [id]);
}

/**
 * Top-level backups of `ids` that deleteBackup would accept (not being created,
 * restored from or deleted, no FULL_SERVER image depending on them) and their
 * children: DELETING, in one statement. Returns those it took; the rest are left as they are.
 */
export async function markDeletingMany(q: Queryable, projectId: string, ids: string[]): Promise<{ id: string; server_id: string | null; disk_id: string | null; resource_type: BackupResourceType }[]> {
  return rows(
    q,
    `WITH top AS (
       UPDATE backups b SET status = '${BackupStatus.DELETING}', updated_at = now()
        WHERE b.id = ANY($1) AND b.project_id = $2 AND b.parent_id IS NULL
          AND b.status NOT IN ('${BackupStatus.CREATING}', '${BackupStatus.RESTORING}', '${BackupStatus.DELETING}')
          AND NOT EXISTS (SELECT 1 FROM images i WHERE i.source_backup_id = b.id AND i.type = '${ImageType.FULL_SERVER}' AND i.project_id = $2 AND i.status <> '${ImageStatus.KILLED}')
       RETURNING b.id, b.server_id, b.disk_id, b.resource_type
     ), children AS (
       UPDATE backups c SET status = '${BackupStatus.DELETING}', updated_at = now() FROM top WHERE c.parent_id = top.id
     )
     SELECT * FROM top`,
    [ids, projectId],
  );
}

/** Its data and block list are durable in the vault: AVAILABLE, with the bytes it added to the vault. */
export async function markStored(q: Queryable, id: string, storedBytes: number): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.AVAILABLE}', progress = 1, completed_at = now(), stored_bytes = $2, updated_at = now() WHERE id = $1`, [id, storedBytes]);
}

/** The progress of a backup being taken or restored from. */
export async function recordProgress(q: Queryable, id: string, progress: number): Promise<void> {
  await q.query(`UPDATE backups SET progress = $2 WHERE id = $1 AND status IN ('${BackupStatus.CREATING}', '${BackupStatus.RESTORING}')`, [id, progress]);
}

/** A backup that did not finish never becomes AVAILABLE: those of `ids` still CREATING become ERROR with the reason. */
export async function failCreating(q: Queryable, ids: string[], code: FailureCode | ErrorCode, message: string): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.ERROR}', error_code = $2, error = $3, updated_at = now() WHERE id = ANY($1) AND status = '${BackupStatus.CREATING}'`, [
    ids,
    code,
    message,
  ]);
}

/** A deletion that did not finish leaves the backup as it was: AVAILABLE. */
export async function cancelDeleting(q: Queryable, id: string): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.AVAILABLE}', updated_at = now() WHERE (id = $1 OR parent_id = $1) AND status = '${BackupStatus.DELETING}'`, [id]);
}

/** Verification found damaged chunks: ERROR, so nothing restores from it. */
export async function markCorrupt(q: Queryable, id: string, message: string): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.ERROR}', error_code = '${FailureCode.CORRUPT_CHUNK}', error = $2, updated_at = now() WHERE id = $1 OR parent_id = $1`, [id, message]);
}

/** Verification found every chunk whole: a backup marked ERROR by an earlier one is AVAILABLE again. */
export async function markVerified(q: Queryable, id: string): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.AVAILABLE}', error_code = NULL, error = NULL, updated_at = now() WHERE (id = $1 OR parent_id = $1) AND status = '${BackupStatus.ERROR}'`, [
    id,
  ]);
}

/** A restore from it ended: AVAILABLE again. */
export async function endRestoring(q: Queryable, id: string): Promise<void> {
  await q.query(`UPDATE backups SET status = '${BackupStatus.AVAILABLE}', updated_at = now() WHERE (id = $1 OR parent_id = $1) AND status = '${BackupStatus.RESTORING}'`, [id]);
}

/** A restore from it failed: usable again, unless it turned out damaged (ERROR with the reason). */
export async function failRestoring(q: Queryable, id: string, outcome: { code: FailureCode | ErrorCode; message: string }): Promise<void> {
  if (outcome.code !== FailureCode.CORRUPT_CHUNK) return endRestoring(q, id);
  await q.query(`UPDATE backups SET status = '${BackupStatus.ERROR}', error_code = $2, error = $3, updated_at = now() WHERE (id = $1 OR parent_id = $1) AND status = '${BackupStatus.RESTORING}'`, [
    id,
    outcome.code,
    outcome.message,
  ]);
}
