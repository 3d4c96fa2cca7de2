import type { DataSource } from "typeorm";
import { rows } from "../../db/sql";
import { Backup, BackupStatus, JobType, type Job } from "../../entities";
import type { Vault } from "../../storage/vault";
import { BLOCK_SIZE, type VolumeStore } from "../../storage/volume-store";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";

const BATCH = 512;

interface Pending {
  block_index: string;
  hash: Buffer;
  src_segment: string;
  src_offset: string;
}

/**
 * Copies a backup's captured blocks into the vault. Blocks whose chunk the vault
 * already holds are not read at all; the rest are read from their volume
 * segments, compressed and packed. The backup becomes AVAILABLE only once every
 * chunk it names is indexed in the vault.
 */
export class BackupHandler implements JobHandler {
  readonly type = JobType.BACKUP;

  constructor(
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
  ) {}

  private async parts(job: Job): Promise<Backup[]> {
    const top = await this.ds.getRepository(Backup).findOneByOrFail({ id: job.backupId! });
    const children = await this.ds.getRepository(Backup).find({ where: { parentId: top.id }, order: { device: "ASC" } });
    return children.length ? children : [top];
  }

  async run(ctx: JobContext): Promise<void> {
    const { job } = ctx;
    const parts = await this.parts(job);
    const [{ n }] = await rows<{ n: string }>(this.ds, `SELECT count(*) AS n FROM backup_blocks WHERE backup_id = ANY($1) AND src_segment IS NOT NULL`, [parts.map((p) => p.id)]);
    const total = Number(n) * BLOCK_SIZE;
    let done = 0;
    await ctx.progress(0, total);
    const stored = new Map<string, number>();

    for (const part of parts) {
      const writer = this.vault.writer(job.projectId);
      let after = -1;
      for (;;) {
        ctx.checkCancelled();
        const batch = await rows<Pending>(
          this.ds,
          `SELECT block_index, hash, src_segment, src_offset FROM backup_blocks
            WHERE backup_id = $1 AND src_segment IS NOT NULL AND block_index > $2 ORDER BY block_index LIMIT ${BATCH}`,
          [part.id, after],
        );
        if (!batch.length) break;
        after = Number(batch[batch.length - 1].block_index);
        const have = await this.vault.existing(job.projectId, batch.map((b) => b.hash));
        const missing = batch
          .filter((b) => !have.has(b.hash.toString("hex")) && !writer.has(b.hash))
          .sort((a, b) => (a.src_segment === b.src_segment ? Number(a.src_offset) - Number(b.src_offset) : a.src_segment < b.src_segment ? -1 : 1));
        const data = await this.volumes.readRefs(
          part.resourceId,
          missing.map((m) => ({ segmentId: m.src_segment, offset: Number(m.src_offset) })),
        );
        for (let i = 0; i < missing.length; i++) await writer.add(missing[i].hash, data[i]);
        done += batch.length * BLOCK_SIZE;
        await ctx.progress(done, total);
      }
      await writer.flush();
      stored.set(part.id, writer.storedBytes);
    }
    ctx.checkCancelled();

    await this.ds.transaction(async (em) => {
      const ids = parts.map((p) => p.id);
      const [{ missing }] = await rows<{ missing: string }>(
        em,
        `SELECT count(*) AS missing FROM backup_blocks bb WHERE bb.backup_id = ANY($1) AND bb.hash IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.project_id = $2 AND c.hash = bb.hash)`,
        [ids, job.projectId],
      );
      if (Number(missing) > 0) throw new JobFailure("INCOMPLETE", `${missing} blocks have no chunk in the vault`);
      await em.query(`UPDATE backup_blocks SET src_segment = NULL, src_offset = NULL WHERE backup_id = ANY($1) AND src_segment IS NOT NULL`, [ids]);
      for (const p of parts) {
        await em.query(`UPDATE backups SET status = 'AVAILABLE', progress = 1, completed_at = now(), stored_bytes = $2, updated_at = now() WHERE id = $1`, [p.id, stored.get(p.id) ?? 0]);
      }
      if (job.backupId && !ids.includes(job.backupId)) {
        const sum = [...stored.values()].reduce((a, b) => a + b, 0);
        await em.query(`UPDATE backups SET status = 'AVAILABLE', progress = 1, completed_at = now(), stored_bytes = $2, updated_at = now() WHERE id = $1`, [job.backupId, sum]);
      }
    });
  }

  /** A backup that did not finish never becomes AVAILABLE: it is marked ERROR and its captured blocks are dropped. */
  async cleanup(job: Job, outcome: JobOutcome): Promise<void> {
    if (!job.backupId) return;
    await this.ds.transaction(async (em) => {
      const ids = (await rows<{ id: string }>(em, `SELECT id FROM backups WHERE id = $1 OR parent_id = $1`, [job.backupId])).map((r) => r.id);
      await em.query(`DELETE FROM backup_blocks WHERE backup_id = ANY($1)`, [ids]);
      await em.query(`UPDATE backups SET status = $2, error = $3, updated_at = now() WHERE id = ANY($1) AND status = 'CREATING'`, [ids, BackupStatus.ERROR, outcome.message]);
    });
  }
}
