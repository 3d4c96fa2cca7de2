import crypto from "node:crypto";
import type { DataSource } from "typeorm";
import { rows } from "../../db/sql";
import { Backup, ImageStatus, JobType, type Job } from "../../entities";
import { addImageDisksFromBackup, type CreateImagePayload } from "../../services/image.service";
import { hex, type Vault } from "../../storage/vault";
import { BLOCK_SIZE, type VolumeStore } from "../../storage/volume-store";
import { copyPendingBlocks, countPending, sealPending } from "../copy-blocks";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";

const READ_BATCH = 128;
const ZERO = Buffer.alloc(BLOCK_SIZE);

interface ImageDiskRow {
  id: string;
  size_bytes: string;
}

/** Reads an image disk's blocks from the vault in order (each checked against its hash). */
export async function* imageDiskBlocks(ds: DataSource, vault: Vault, projectId: string, imageDiskId: string): AsyncIterable<{ index: number; data: Buffer }> {
  let after = -1;
  for (;;) {
    const batch = await rows<{ block_index: string; hash: Buffer }>(
      ds,
      `SELECT block_index, hash FROM image_blocks WHERE image_disk_id = $1 AND block_index > $2 ORDER BY block_index LIMIT ${READ_BATCH}`,
      [imageDiskId, after],
    );
    if (!batch.length) return;
    after = Number(batch[batch.length - 1].block_index);
    const chunks = await vault.readChunks(projectId, batch.map((b) => b.hash));
    for (const b of batch) yield { index: Number(b.block_index), data: chunks.get(hex(b.hash))! };
  }
}

/** SHA-256 of a disk's raw bytes from its blocks, zeros in the gaps; `sizeBytes` long. */
export class RawChecksum {
  private readonly hash = crypto.createHash("sha256");
  private next = 0;
  constructor(private readonly sizeBytes: number) {}
  private zerosTo(index: number) {
    while (this.next < index) {
      this.hash.update(this.next === this.lastIndex ? ZERO.subarray(0, this.tail) : ZERO);
      this.next++;
    }
  }
  private get lastIndex() {
    return Math.ceil(this.sizeBytes / BLOCK_SIZE) - 1;
  }
  private get tail() {
    return this.sizeBytes - this.lastIndex * BLOCK_SIZE;
  }
  add(index: number, data: Buffer) {
    this.zerosTo(index);
    this.hash.update(index === this.lastIndex ? data.subarray(0, this.tail) : data);
    this.next = index + 1;
  }
  digest(): string {
    this.zerosTo(this.lastIndex + 1);
    return this.hash.digest("hex");
  }
}

/**
 * Makes an image ACTIVE: waits for the backup a FULL_SERVER image is taken from,
 * copies blocks captured from a disk into the vault (sharing chunks it already
 * holds), computes each disk's SHA-256 over its raw bytes, and sizes the image by
 * the compressed chunks it references.
 */
export class CreateImageHandler implements JobHandler {
  readonly type = JobType.CREATE_IMAGE;

  constructor(
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
  ) {}

  async run(ctx: JobContext): Promise<void> {
    const { job } = ctx;
    const payload = job.payload as CreateImagePayload;
    if (payload.awaitBackupId) await this.awaitBackup(ctx, payload.awaitBackupId);
    await this.ds.query(`UPDATE images SET status = 'SAVING', updated_at = now() WHERE id = $1`, [job.imageId]);
    const disks = await rows<ImageDiskRow>(this.ds, `SELECT id, size_bytes FROM image_disks WHERE image_id = $1 ORDER BY disk_index`, [job.imageId]);

    const pendingOf = (d: ImageDiskRow) => ({ table: "image_blocks" as const, ownerColumn: "image_disk_id" as const, ownerId: d.id, diskId: payload.sourceDiskId ?? "", projectId: job.projectId });
    let total = 0;
    for (const d of disks) {
      if (payload.sourceDiskId) total += (await countPending(this.ds, pendingOf(d))) * BLOCK_SIZE;
      const [{ n }] = await rows<{ n: string }>(this.ds, `SELECT count(*) AS n FROM image_blocks WHERE image_disk_id = $1`, [d.id]);
      total += Number(n) * BLOCK_SIZE;
    }
    let done = 0;
    const step = async (blocks: number) => {
      done += blocks * BLOCK_SIZE;
      await ctx.progress(done, total);
    };
    await ctx.progress(0, total);
    for (const d of disks) {
      if (payload.sourceDiskId) await copyPendingBlocks(this.ds, this.volumes, this.vault, pendingOf(d), step, ctx.checkCancelled);
    }
    await this.ds.transaction(async (em) => {
      const missing = await sealPending(em, { table: "image_blocks", ownerColumn: "image_disk_id", ownerIds: disks.map((d) => d.id), projectId: job.projectId });
      if (missing) throw new JobFailure("INCOMPLETE", `${missing} blocks have no chunk in the vault`);
    });
    const checksums: string[] = [];
    for (const d of disks) {
      const sum = new RawChecksum(Number(d.size_bytes));
      let n = 0;
      for await (const b of imageDiskBlocks(this.ds, this.vault, job.projectId, d.id)) {
        sum.add(b.index, b.data);
        if (++n % READ_BATCH === 0) await step(READ_BATCH);
      }
      checksums.push(sum.digest());
      await this.ds.query(`UPDATE image_disks SET checksum = $2 WHERE id = $1`, [d.id, checksums[checksums.length - 1]]);
    }
    ctx.checkCancelled();
    await finishImage(this.ds, job, checksums[0] ?? null);
  }

  private async awaitBackup(ctx: JobContext, backupId: string): Promise<void> {
    for (;;) {
      ctx.checkCancelled();
      const backup = await this.ds.getRepository(Backup).findOneBy({ id: backupId });
      if (!backup) throw new JobFailure("BACKUP_GONE", "the backup the image was to be made from was deleted");
      if (backup.status === "ERROR") throw new JobFailure("BACKUP_FAILED", `the backup the image is made from failed: ${backup.error ?? "unknown reason"}`);
      if (backup.status === "AVAILABLE") {
        const parts = await this.ds.getRepository(Backup).find({ where: { parentId: backup.id }, order: { device: "ASC" } });
        await this.ds.transaction((em) => addImageDisksFromBackup(em, ctx.job.imageId!, parts.length ? parts : [backup]));
        return;
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  async cleanup(job: Job, outcome: JobOutcome): Promise<void> {
    await killImage(this.ds, job, outcome);
  }
}

/** ACTIVE, with the stored size of the distinct chunks it references. */
export async function finishImage(ds: DataSource, job: Job, checksum: string | null, extra: { virtualSizeBytes?: number; minDiskBytes?: number } = {}): Promise<void> {
  await ds.query(
    `UPDATE images i SET status = 'ACTIVE', checksum = $2, updated_at = now(), error = NULL,
            virtual_size_bytes = coalesce($3, i.virtual_size_bytes), min_disk_bytes = greatest(i.min_disk_bytes, coalesce($4, 0)),
            size_bytes = (SELECT coalesce(sum(c.stored_size), 0) FROM vault_chunks c WHERE c.project_id = i.project_id
                           AND c.hash IN (SELECT ib.hash FROM image_blocks ib JOIN image_disks d ON d.id = ib.image_disk_id WHERE d.image_id = i.id))
      WHERE id = $1`,
    [job.imageId, checksum, extra.virtualSizeBytes ?? null, extra.minDiskBytes ?? null],
  );
}

/** KILLED with the reason; its blocks go, so their chunks can be reclaimed. */
export async function killImage(ds: DataSource, job: Job, outcome: JobOutcome): Promise<void> {
  if (!job.imageId) return;
  await ds.transaction(async (em) => {
    await em.query(`DELETE FROM image_blocks WHERE image_disk_id IN (SELECT id FROM image_disks WHERE image_id = $1)`, [job.imageId]);
    await em.query(`UPDATE images SET status = $2, error = $3, updated_at = now() WHERE id = $1`, [job.imageId, ImageStatus.KILLED, outcome.message]);
  });
}
