import type { DataSource } from "typeorm";
import { rows } from "../../db/sql";
import { DiskStatus, JobType, ServerStatus, type Job } from "../../entities";
import type { RestorePlan } from "../../services/backup.service";
import { MANIFEST_BATCH, PACKED_BLOCKS, packedBlocks, resolvePackedManifest } from "../../storage/manifest";
import { hex, type Vault } from "../../storage/vault";
import { BLOCK_SIZE, type BlockBatch, type BlockWrite, type VolumeStore } from "../../storage/volume-store";
import type { JobContext, JobHandler, JobOutcome } from "../runner";

/** Where a disk's bytes come from: a disk backup (through its chain) or a disk of an image. */
interface Source {
  backupId?: string;
  imageDiskId?: string;
}

interface Diff {
  write: { index: number; hash: Buffer }[];
  zero: number[];
}

/**
 * Makes disks read back exactly a backup's bytes, writing only the blocks whose
 * content differs (compared by SHA-256, without reading the disk) and zeroing
 * blocks the backup does not hold. Serves restoreBackup, and createDisk and
 * createServer from a backup or an image.
 */
export class RestoreHandler implements JobHandler {
  constructor(
    readonly type: JobType.RESTORE | JobType.CREATE_DISK,
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
  ) {}

  private plan(job: Job): RestorePlan {
    return (job.payload as { plan: RestorePlan }).plan;
  }

  private async diff(source: Source, diskId: string, first: number, last: number): Promise<Diff> {
    const want = source.imageDiskId
      ? await packedBlocks(this.ds, `SELECT ${PACKED_BLOCKS} FROM image_blocks WHERE image_disk_id = $1 AND block_index BETWEEN $2 AND $3 AND hash IS NOT NULL`, [source.imageDiskId, first, last])
      : await resolvePackedManifest(this.ds, source.backupId!, first, last);
    const now = await packedBlocks(this.ds, `SELECT ${PACKED_BLOCKS} FROM disk_blocks WHERE disk_id = $1 AND block_index BETWEEN $2 AND $3 AND hash IS NOT NULL`, [diskId, first, last]);
    // Both lists are in block order: walk them side by side.
    const write: Diff["write"] = [];
    const zero: number[] = [];
    let j = 0;
    for (let k = 0; k < want.indexes.length; k++) {
      const index = want.indexes[k];
      while (j < now.indexes.length && now.indexes[j] < index) zero.push(now.indexes[j++]);
      let same = false;
      if (j < now.indexes.length && now.indexes[j] === index) {
        same = want.hashes.compare(now.hashes, j * 32, j * 32 + 32, k * 32, k * 32 + 32) === 0;
        j++;
      }
      if (!same) write.push({ index, hash: want.hashes.subarray(k * 32, k * 32 + 32) });
    }
    while (j < now.indexes.length) zero.push(now.indexes[j++]);
    return { write, zero };
  }

  async run(ctx: JobContext): Promise<void> {
    const { job } = ctx;
    const plan = this.plan(job);
    const targets: (Source & { diskId: string; blocks: number })[] = [];
    for (const t of plan.targets) {
      const [disk] = await rows<{ size_bytes: string }>(this.ds, `SELECT size_bytes FROM disks WHERE id = $1`, [t.diskId]);
      targets.push({ ...t, blocks: Math.ceil(Number(disk.size_bytes) / BLOCK_SIZE) });
    }
    // First the size of the work, from the block maps alone.
    let total = 0;
    for (const t of targets) {
      for (let first = 0; first < t.blocks; first += MANIFEST_BATCH) {
        const d = await this.diff(t, t.diskId, first, Math.min(t.blocks, first + MANIFEST_BATCH) - 1);
        total += d.write.length * BLOCK_SIZE;
      }
    }
    let done = 0;
    await ctx.progress(0, total);

    const buffers = this.vault.codec.buffers;
    const self = this;
    for (const t of targets) {
      // Each batch is planned while the one before it is written (their blocks differ, so
      // nothing it compares can change meanwhile); reads run on across the border.
      const batches = async function* () {
        const planOf = (first: number) => self.diff(t, t.diskId, first, Math.min(t.blocks, first + MANIFEST_BATCH) - 1);
        let next: Promise<Diff> | null = t.blocks > 0 ? planOf(0) : null;
        for (let first = 0; next; first += MANIFEST_BATCH) {
          const d = await next;
          next = first + MANIFEST_BATCH < t.blocks ? planOf(first + MANIFEST_BATCH) : null;
          next?.catch(() => undefined); // awaited on the next turn
          // Blocks with the same bytes share one copy in the segment.
          const byHash = new Map<string, number[]>();
          for (const p of d.write) {
            const key = hex(p.hash);
            const list = byHash.get(key);
            if (list) list.push(p.index);
            else byHash.set(key, [p.index]);
          }
          yield { zero: d.zero, byHash, hashes: d.write.map((p) => p.hash) };
        }
      };
      const blocks = async function* (): AsyncIterable<BlockWrite | BlockBatch> {
        // Runs of chunks come checked against their hashes, a few in flight while earlier ones are written.
        for await (const run of self.vault.readBatches(job.projectId, batches())) {
          ctx.checkCancelled();
          if (!run.data) {
            for (const index of run.batch.zero) yield { index, data: null };
            continue;
          }
          const data = run.data;
          const batch: BlockBatch = { data, blocks: [], release: () => buffers.give(data) };
          run.hashes.forEach((hash, slot) => {
            for (const index of run.batch.byHash.get(hex(hash))!) batch.blocks.push({ index, slot, hash });
          });
          yield batch;
          done += batch.blocks.length * BLOCK_SIZE;
          await ctx.progress(done, total);
        }
      };
      await this.volumes.withDiskLock(t.diskId, () => this.volumes.putBlocks(job.projectId, t.diskId, blocks(), { bypassCache: true }));
    }
    ctx.checkCancelled();

    await this.ds.transaction(async (em) => {
      for (const [diskId, status] of Object.entries(plan.diskStatus)) {
        await em.query(`UPDATE disks SET status = $2, updated_at = now() WHERE id = $1`, [diskId, status]);
      }
      if (plan.serverId) {
        await em.query(`UPDATE servers SET status = $2, updated_at = now() WHERE id = $1`, [plan.serverId, plan.powerOn ? ServerStatus.ACTIVE : ServerStatus.SHUTOFF]);
      }
      if (job.backupId) await em.query(`UPDATE backups SET status = 'AVAILABLE', updated_at = now() WHERE (id = $1 OR parent_id = $1) AND status = 'RESTORING'`, [job.backupId]);
    });
  }

  /** Disks left half-restored are marked ERROR (restore again or delete them); the server stays stopped; the backup is usable again. */
  async cleanup(job: Job, _outcome: JobOutcome): Promise<void> {
    const plan = this.plan(job);
    await this.ds.transaction(async (em) => {
      await em.query(`UPDATE disks SET status = $2, updated_at = now() WHERE id = ANY($1)`, [Object.keys(plan.diskStatus), DiskStatus.ERROR]);
      // A server being built from an image has nothing to fall back to: ERROR. A restored one stays stopped.
      if (plan.serverId) await em.query(`UPDATE servers SET status = CASE WHEN status = 'BUILDING' THEN 'ERROR' ELSE 'SHUTOFF' END, updated_at = now() WHERE id = $1 AND status IN ('RESTORING', 'BUILDING')`, [plan.serverId]);
      if (job.backupId) await em.query(`UPDATE backups SET status = 'AVAILABLE', updated_at = now() WHERE (id = $1 OR parent_id = $1) AND status = 'RESTORING'`, [job.backupId]);
    });
  }
}
