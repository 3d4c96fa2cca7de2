import type { DataSource } from "typeorm";
import { rows } from "../../db/sql";
import type { JobOf } from "../../domain/jobs";
import * as backupStatus from "../../domain/status/backup";
import { JobType } from "../../entities";
import type { Logger } from "../../logger";
import { detachClones } from "../../storage/clones";
import type { Vault } from "../../storage/vault";
import type { JobContext, JobHandler, JobOutcome } from "../runner";

/**
 * Deletes a backup without breaking any other: the blocks it recorded that its
 * successors (the backups based on it) still need move to them, the successors
 * are re-based onto its own base, disks made from it keep its block list (see
 * detachClones), then its rows go and garbage collection reclaims the chunks
 * nothing references any more.
 */
export class DeleteBackupHandler implements JobHandler<JobType.DELETE_BACKUP> {
  readonly type = JobType.DELETE_BACKUP;

  constructor(
    private readonly ds: DataSource,
    private readonly vault: Vault,
    private readonly graceMs: () => number,
    private readonly logger: Logger,
  ) {}

  async run(ctx: JobContext<JobType.DELETE_BACKUP>): Promise<void> {
    const { job } = ctx;
    await ctx.progress(0, 1);
    await ctx.commit(async (em) => {
      const parts = await rows<{ id: string; base_id: string | null }>(em, `SELECT id, base_id FROM backups WHERE id = $1 OR parent_id = $1 FOR UPDATE`, [job.backupId]);
      // Disks made from it (clones) read from its block list from now on, kept as it is.
      await detachClones(em, { backupIds: parts.map((p) => p.id) });
      for (const part of parts) {
        const successors = await rows<{ id: string }>(em, `SELECT id FROM backups WHERE base_id = $1 AND id <> $1 FOR UPDATE`, [part.id]);
        for (const s of successors) {
          await em.query(
            `INSERT INTO backup_blocks (backup_id, block_index, hash)
             SELECT $2, d.block_index, d.hash FROM backup_blocks d WHERE d.backup_id = $1
             ON CONFLICT (backup_id, block_index) DO NOTHING`,
            [part.id, s.id],
          );
        }
        await em.query(`UPDATE backups SET base_id = $2 WHERE base_id = $1 AND id <> $1`, [part.id, part.base_id]);
      }
      // Images made from the backup keep their own blocks; they only lose the link.
      await em.query(`DELETE FROM backups WHERE parent_id = $1`, [job.backupId]);
      await em.query(`DELETE FROM backups WHERE id = $1`, [job.backupId]);
    });
    await ctx.progress(1, 2);
    const gc = await this.vault.collectGarbage(job.projectId, this.graceMs());
    this.logger.info("backup deleted", { job: job.id, backup: job.backupId, project: job.projectId, reclaimed: gc });
  }

  async cleanup(job: JobOf<JobType.DELETE_BACKUP>, _outcome: JobOutcome): Promise<void> {
    await backupStatus.cancelDeleting(this.ds, job.backupId);
  }
}
