import type { DataSource } from "typeorm";
import { HASH_BYTES, rows } from "../../db/sql";
import { FailureCode, type JobOf, type RestorePlan } from "../../domain/jobs";
import * as backupStatus from "../../domain/status/backup";
import * as diskStatus from "../../domain/status/disk";
import * as serverStatus from "../../domain/status/server";
import { JobType } from "../../entities";
import { dataRanges, type BlockSource } from "../../storage/manifest";
import { ChunkError, type Vault } from "../../storage/vault";
import { BLOCK_SIZE, type BlockBatch, type BlockWrite, type VolumeStore } from "../../storage/volume-store";
import { JobFailure, type JobContext, type JobHandler, type JobOutcome } from "../runner";

type Source = BlockSource;

/** Blocks planned in the first batch: few, so the first reads and writes start soon. */
const FIRST_BATCH = 512;

/**
 * Makes disks read back exactly a backup's bytes, writing only the blocks whose
 * content differs (compared by SHA-256, without reading the disk) and zeroing
 * blocks the backup does not hold. Serves restoreBackup (and CREATE_DISK jobs
 * queued before disks were made as clones).
 */
type RestoreJobType = JobType.RESTORE | JobType.CREATE_DISK;

export class RestoreHandler implements JobHandler<RestoreJobType> {
  constructor(
    readonly type: RestoreJobType,
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
  ) {}

  async run(ctx: JobContext<RestoreJobType>): Promise<void> {
    const { job } = ctx;
    const { plan } = job.payload as { plan: RestorePlan };
    // The batches cover the blocks the source records or the disk holds, whatever the disk's size.
    const targets: (Source & { diskId: string; ranges: [number, number][] })[] = [];
    for (const t of plan.targets) targets.push({ ...t, ranges: await dataRanges(this.ds, t, { diskId: t.diskId, firstSize: FIRST_BATCH }) });
    // The size of the work, from the block maps alone, is counted while the first batch is
    // planned and read; nothing is written before it is counted, so the count sees no block restored.
    const counting = (async () => {
      let total = 0;
      for (const t of targets) for (const [first, last] of t.ranges) total += (await this.vault.restoreCount(t, t.diskId, first, last)) * BLOCK_SIZE;
      await ctx.progress(0, total);
      return total;
    })();
    counting.catch(() => undefined); // awaited below
    let total: number | null = null;
    let done = 0;

    const buffers = this.vault.codec.buffers;
    const self = this;
    for (const t of targets) {
      // Each batch is planned while the one before it is written (their blocks differ, so
      // nothing it compares can change meanwhile); reads run on across the border.
      const plans = async function* () {
        const ranges = t.ranges;
        const planOf = (k: number) => (k < ranges.length ? self.vault.restorePlan(job.projectId, t, t.diskId, ...ranges[k]) : null);
        let next = planOf(0);
        for (let k = 1; next; k++) {
          const plan = await next;
          next = planOf(k);
          next?.catch(() => undefined); // awaited on the next turn
          yield plan;
        }
      };
      const blocks = async function* (): AsyncIterable<BlockWrite | BlockBatch> {
        // Runs of chunks come checked against their hashes, a few in flight while earlier ones are written.
        for await (const run of self.vault.readPacks(job.projectId, plans())) {
          total ??= await counting;
          ctx.checkCancelled();
          if (!run.pack) {
            ctx.visit(run.batch.zero.length);
            for (const index of run.batch.zero) yield { index, data: null };
            continue;
          }
          const { pack, from, to, data } = run;
          const first = pack.starts[from];
          const slots = new Uint32Array(pack.starts[to] - first);
          for (let k = from; k < to; k++) slots.fill(k - from, pack.starts[k] - first, pack.starts[k + 1] - first);
          ctx.visit(slots.length);
          yield { data, hashes: pack.hashes.subarray(from * HASH_BYTES, to * HASH_BYTES), indexes: pack.blocks.subarray(first, pack.starts[to]), slots, release: () => buffers.give(data) };
          done += slots.length * BLOCK_SIZE;
          await ctx.progress(done, total);
        }
      };
      // Staged, not written: the disk changes only in the commit below, all at once.
      try {
        await this.volumes.withDiskLock(t.diskId, () => this.volumes.putBlocks(job.projectId, t.diskId, blocks(), { bypassCache: true, stage: job.id }));
      } catch (err) {
        if (err instanceof ChunkError) throw new JobFailure(FailureCode.CORRUPT_CHUNK, await this.damaged(t, err));
        throw err;
      }
    }
    await counting;
    ctx.checkCancelled();

    await ctx.commit(async (em) => {
      for (const t of targets) await this.volumes.publish(em, t.diskId, job.id);
      for (const [diskId, status] of Object.entries(plan.diskStatus)) await diskStatus.markRestored(em, diskId, status);
      if (plan.serverId) await serverStatus.markRestored(em, plan.serverId, plan.powerOn);
      if (job.backupId) await backupStatus.endRestoring(em, job.backupId);
    });
  }

  /** The message of a restore that met a damaged chunk: which backup or image, and what is wrong with the chunk. */
  private async damaged(t: Source, err: ChunkError): Promise<string> {
    if (t.backupId) {
      const [b] = await rows<{ name: string }>(this.ds, `SELECT name FROM backups WHERE id = $1`, [t.backupId]);
      return `backup ${b?.name ?? t.backupId} is damaged (${err.message}); it is marked ERROR and nothing was restored: restore another backup`;
    }
    const [i] = await rows<{ name: string }>(this.ds, `SELECT i.name FROM image_disks d JOIN images i ON i.id = d.image_id WHERE d.id = $1`, [t.imageDiskId]);
    return `image ${i?.name ?? t.imageDiskId} is damaged (${err.message})`;
  }

  /**
   * Drops what the job staged, so a restored disk is exactly as it was, back in its
   * status; a disk being created had nothing and is marked ERROR. The server stays
   * stopped. The backup is usable again, unless it turned out damaged (ERROR).
   */
  async cleanup(job: JobOf<RestoreJobType>, outcome: JobOutcome): Promise<void> {
    const { plan } = job.payload as { plan: RestorePlan };
    await this.ds.transaction(async (em) => {
      await this.volumes.discardStaged(em, job.id);
      const before = job.type === JobType.CREATE_DISK ? null : (plan.diskStatusBefore ?? plan.diskStatus);
      for (const diskId of Object.keys(plan.diskStatus)) await diskStatus.failRestoring(em, diskId, before?.[diskId] ?? null);
      if (plan.serverId) await serverStatus.failRestoring(em, plan.serverId);
      if (job.backupId) await backupStatus.failRestoring(em, job.backupId, outcome);
    });
  }
}
