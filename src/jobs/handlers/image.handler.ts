import type { DataSource } from "typeorm";
import { rows } from "../../db/sql";
import { FailureCode, type JobOf } from "../../domain/jobs";
import * as imageStatus from "../../domain/status/image";
import { Backup, BackupStatus, JobType, type Job } from "../../entities";
import { addImageDisksFromBackup } from "../../storage/manifest";
import { ContentChecksum } from "../../formats/checksum";
import { mapOrdered } from "../../storage/pipeline";
import { hex, type Vault } from "../../storage/vault";
import { BLOCK_SIZE, type VolumeStore } from "../../storage/volume-store";
import { copyPendingBlocks, countPending, sealPending } from "../copy-blocks";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";

const READ_BATCH = 128;

interface ImageDiskRow {
  id: string;
  size_bytes: string;
}

/**
 * Reads an image disk's blocks from the vault in order (each checked), the next
 * batch read and decoded while this one is consumed. The blocks' buffers are
 * reused: a block's bytes stay valid while the consumer takes READ_BATCH more
 * blocks, so a consumer copies what it keeps longer.
 */
export async function* imageDiskBlocks(ds: DataSource, vault: Vault, projectId: string, imageDiskId: string): AsyncIterable<{ index: number; data: Buffer }> {
  async function* batches() {
    let after = -1;
    for (;;) {
      const batch = await rows<{ block_index: string; hash: Buffer }>(
        ds,
        `SELECT block_index, hash FROM image_blocks WHERE image_disk_id = $1 AND block_index > $2 ORDER BY block_index LIMIT ${READ_BATCH}`,
        [imageDiskId, after],
      );
      if (!batch.length) return;
      after = Number(batch[batch.length - 1].block_index);
      yield batch;
    }
  }
  const read = async (batch: { block_index: string; hash: Buffer }[]) => {
    const runs: Buffer[] = [];
    const chunks = new Map<string, Buffer>();
    for await (const run of vault.readRuns(
      projectId,
      batch.map((b) => b.hash),
    )) {
      runs.push(run.data);
      run.hashes.forEach((h, k) => chunks.set(hex(h), run.data.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE)));
    }
    return { batch, chunks, runs };
  };
  const buffers = vault.codec.buffers;
  let previous: Buffer[] = [];
  let older: Buffer[] = [];
  for await (const { batch, chunks, runs } of mapOrdered(batches(), 2, read)) {
    // Every batch but the last holds READ_BATCH blocks, so the one before the
    // previous has been out of hand for at least that many: its buffers go back.
    for (const r of older) buffers.give(r);
    older = previous;
    previous = runs;
    for (const b of batch) yield { index: Number(b.block_index), data: chunks.get(hex(b.hash))! };
  }
}

/** Rows of an image disk's block list read per statement. */
const CHECKSUM_BATCH = 16384;

/**
 * The content checksum of an image disk from its block list alone (the chunks'
 * hashes), reading no data; `visit` counts the blocks.
 */
export async function imageDiskChecksum(ds: DataSource, imageDiskId: string, sizeBytes: number, ctx: Pick<JobContext, "visit" | "checkCancelled">): Promise<string> {
  const sum = new ContentChecksum();
  for (let after = -1; ;) {
    ctx.checkCancelled();
    const batch = await rows<{ block_index: string; hash: Buffer }>(
      ds,
      `SELECT block_index, hash FROM image_blocks WHERE image_disk_id = $1 AND block_index > $2 ORDER BY block_index LIMIT ${CHECKSUM_BATCH}`,
      [imageDiskId, after],
    );
    if (!batch.length) break;
    for (const b of batch) sum.add(Number(b.block_index), b.hash);
    ctx.visit(batch.length);
    after = Number(batch[batch.length - 1].block_index);
  }
  return sum.hex(sizeBytes);
}

/**
 * Makes an image ACTIVE: waits for the backup a FULL_SERVER image is taken from,
 * copies blocks captured from a disk into the vault (sharing chunks it already
 * holds), computes each disk's SHA-256 over its raw bytes, and sizes the image by
 * the compressed chunks it references.
 */
export class CreateImageHandler implements JobHandler<JobType.CREATE_IMAGE> {
  readonly type = JobType.CREATE_IMAGE;

  constructor(
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
  ) {}

  async run(ctx: JobContext<JobType.CREATE_IMAGE>): Promise<void> {
    const { job } = ctx;
    const { payload } = job;
    if (payload.awaitBackupId) await this.awaitBackup(ctx, payload.awaitBackupId);
    await imageStatus.markSaving(this.ds, job.imageId);
    const disks = await rows<ImageDiskRow>(this.ds, `SELECT id, size_bytes FROM image_disks WHERE image_id = $1 ORDER BY disk_index`, [job.imageId]);

    const pendingOf = (d: ImageDiskRow) => ({ table: "image_blocks" as const, ownerColumn: "image_disk_id" as const, ownerId: d.id, diskId: payload.sourceDiskId ?? "", projectId: job.projectId });
    // The work is the blocks captured from the disk that the vault lacks; an image of a backup moves no data.
    let total = 0;
    for (const d of disks) if (payload.sourceDiskId) total += (await countPending(this.ds, pendingOf(d))) * BLOCK_SIZE;
    let done = 0;
    const step = async (blocks: number) => {
      done += blocks * BLOCK_SIZE;
      ctx.visit(blocks);
      await ctx.progress(done, total);
    };
    await ctx.progress(0, total);
    for (const d of disks) {
      if (payload.sourceDiskId) await copyPendingBlocks(this.ds, this.volumes, this.vault, pendingOf(d), step, ctx.checkCancelled);
    }
    await this.ds.transaction(async (em) => {
      const missing = await sealPending(em, { table: "image_blocks", ownerColumn: "image_disk_id", ownerIds: disks.map((d) => d.id), projectId: job.projectId });
      if (missing) throw new JobFailure(FailureCode.INCOMPLETE, `${missing} blocks have no chunk in the vault`);
    });
    const checksums: string[] = [];
    for (const d of disks) {
      checksums.push(await imageDiskChecksum(this.ds, d.id, Number(d.size_bytes), ctx));
      await this.ds.query(`UPDATE image_disks SET checksum = $2 WHERE id = $1`, [d.id, checksums[checksums.length - 1]]);
    }
    ctx.checkCancelled();
    await ctx.commit((em) => imageStatus.markActive(em, job.imageId, checksums[0] ?? null));
  }

  private async awaitBackup(ctx: JobContext<JobType.CREATE_IMAGE>, backupId: string): Promise<void> {
    for (;;) {
      ctx.checkCancelled();
      const backup = await this.ds.getRepository(Backup).findOneBy({ id: backupId });
      if (!backup) throw new JobFailure(FailureCode.BACKUP_GONE, "the backup the image was to be made from was deleted");
      if (backup.status === BackupStatus.ERROR) throw new JobFailure(FailureCode.BACKUP_FAILED, `the backup the image is made from failed: ${backup.error ?? "unknown reason"}`);
      if (backup.status === BackupStatus.AVAILABLE) {
        const parts = await this.ds.getRepository(Backup).find({ where: { parentId: backup.id }, order: { device: "ASC" } });
        await this.ds.transaction((em) => addImageDisksFromBackup(em, ctx.job.imageId, parts.length ? parts : [backup]));
        return;
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  async cleanup(job: JobOf<JobType.CREATE_IMAGE>, outcome: JobOutcome): Promise<void> {
    await killImage(this.ds, job, outcome);
  }
}

/** KILLED with the reason; its blocks go, so their chunks can be reclaimed. */
export async function killImage(ds: DataSource, job: Job, outcome: JobOutcome): Promise<void> {
  if (!job.imageId) return;
  const imageId = job.imageId;
  await ds.transaction((em) => imageStatus.markKilled(em, imageId, outcome.code, outcome.message));
}
