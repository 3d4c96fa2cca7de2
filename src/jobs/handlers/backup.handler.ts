import type { DataSource } from "typeorm";
import { rows } from "../../db/sql";
import { FailureCode, type JobOf } from "../../domain/jobs";
import * as backupStatus from "../../domain/status/backup";
import { Backup, JobType } from "../../entities";
import type { Vault } from "../../storage/vault";
import { BLOCK_SIZE, type VolumeStore } from "../../storage/volume-store";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";
import { copyPendingBlocks, countPending, sealPending, type PendingBlocks } from "../copy-blocks";

/**
 * Copies a backup's captured blocks into the vault. Blocks whose chunk the vault
 * already holds are not read at all; the rest are read from their volume
 * segments, compressed and packed. The backup becomes AVAILABLE only once every
 * chunk it names is indexed in the vault.
 */
export class BackupHandler implements JobHandler<JobType.BACKUP> {
  readonly type = JobType.BACKUP;

  constructor(
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
    /** Called when a policy's backup has become AVAILABLE: its retention runs then. */
    private readonly onPolicyBackup: (projectId: string, policyId: string) => Promise<void> = async () => undefined,
  ) {}

  private async parts(job: JobOf<JobType.BACKUP>): Promise<Backup[]> {
    const top = await this.ds.getRepository(Backup).findOneByOrFail({ id: job.backupId });
    const children = await this.ds.getRepository(Backup).find({ where: { parentId: top.id }, order: { device: "ASC" } });
    return children.length ? children : [top];
  }

  async run(ctx: JobContext<JobType.BACKUP>): Promise<void> {
    const { job } = ctx;
    const parts = await this.parts(job);
    const pending = (part: Backup): PendingBlocks => ({ table: "backup_blocks", ownerColumn: "backup_id", ownerId: part.id, diskId: part.resourceId, projectId: job.projectId });
    let total = 0;
    for (const part of parts) total += (await countPending(this.ds, pending(part))) * BLOCK_SIZE;
    let done = 0;
    await ctx.progress(0, total);
    const stored = new Map<string, number>();
    for (const part of parts) {
      const added = await copyPendingBlocks(
        this.ds,
        this.volumes,
        this.vault,
        pending(part),
        async (n) => {
          done += n * BLOCK_SIZE;
          ctx.visit(n);
          await ctx.progress(done, total);
        },
        ctx.checkCancelled,
      );
      stored.set(part.id, added);
    }
    ctx.checkCancelled();

    await ctx.commit(async (em) => {
      const ids = parts.map((p) => p.id);
      const missing = await sealPending(em, { table: "backup_blocks", ownerColumn: "backup_id", ownerIds: ids, projectId: job.projectId });
      if (missing > 0) throw new JobFailure(FailureCode.INCOMPLETE, `${missing} blocks have no chunk in the vault`);
      for (const p of parts) await backupStatus.markStored(em, p.id, stored.get(p.id) ?? 0);
      if (job.backupId && !ids.includes(job.backupId)) {
        await backupStatus.markStored(
          em,
          job.backupId,
          [...stored.values()].reduce((a, b) => a + b, 0),
        );
      }
    });
    if (job.policyId) await this.onPolicyBackup(job.projectId, job.policyId);
  }

  /** A backup that did not finish never becomes AVAILABLE: it is marked ERROR and its captured blocks are dropped. */
  async cleanup(job: JobOf<JobType.BACKUP>, outcome: JobOutcome): Promise<void> {
    if (!job.backupId) return;
    await this.ds.transaction(async (em) => {
      // Only what is still being made: a backup that became AVAILABLE keeps its blocks, whoever ends the job.
      const ids = (await rows<{ id: string }>(em, `SELECT id FROM backups WHERE (id = $1 OR parent_id = $1) AND status = 'CREATING' FOR UPDATE`, [job.backupId])).map((r) => r.id);
      await em.query(`DELETE FROM backup_blocks WHERE backup_id = ANY($1)`, [ids]);
      await backupStatus.failCreating(em, ids, outcome.code, outcome.message);
    });
  }
}
