import type { DataSource } from "typeorm";
import { rows, type Queryable } from "../../db/sql";
import { FailureCode, type JobOf } from "../../domain/jobs";
import * as backupStatus from "../../domain/status/backup";
import { JobType } from "../../entities";
import { hydrationOf, IS_CLONE, sourcedRanges, stillSourced } from "../../storage/clones";
import { ChunkError, hex, type Vault } from "../../storage/vault";
import { BLOCK_SIZE, DiskReplacedError, type BlockBatch, type VolumeStore } from "../../storage/volume-store";
import { JobFailure, type JobContext, type JobHandler, type JobOutcome } from "../runner";
import type { RestoreHandler } from "./restore.handler";

/** Blocks looked up per statement while walking a clone's source. */
const BATCH_BLOCKS = 4096;

/** The jobs that hydrate: CREATE_DISK (a new disk or server from a backup or image, hydrateDisk) and RESTORE (restoreBackup). */
type HydrateJobType = JobType.CREATE_DISK | JobType.RESTORE;

/**
 * Hydrates clones (createDisk or createServer with `hydrate`, hydrateDisk, restoreBackup): copies the
 * blocks each still reads from its source in the vault into its own storage, while the
 * disk is in use. Every batch commits on its own and only where the disk still has no
 * block of its own (a write made meanwhile wins), so a crash or a cancellation at any
 * instant leaves a whole disk, partly hydrated, and running the job again goes on from
 * there. Once nothing is read from the source, the disk stops being a clone. A
 * restore without `hydrate` has nothing to copy: its job ends at once. A job with a
 * plan (queued before disks were clones) is a copy, as before.
 */
export class HydrateHandler implements JobHandler<HydrateJobType> {
  constructor(
    readonly type: HydrateJobType,
    private readonly ds: DataSource,
    private readonly volumes: VolumeStore,
    private readonly vault: Vault,
    private readonly copy: RestoreHandler,
  ) {}

  async run(ctx: JobContext<HydrateJobType>): Promise<void> {
    const payload = ctx.job.payload;
    if ("plan" in payload) return this.copy.run(ctx);
    const { job } = ctx;
    const disks = await rows<{ id: string; name: string; restores: number }>(this.ds, `SELECT id, name, restores FROM disks d WHERE id = ANY($1) AND project_id = $2 AND ${IS_CLONE("d")}`, [
      payload.hydrate,
      job.projectId,
    ]);
    let total = 0;
    for (const d of disks) total += (await this.pending(d.id)) * BLOCK_SIZE;
    let done = 0;
    await ctx.progress(0, total);
    for (const d of disks) {
      // The walk covers the blocks still read from the source, whatever the disk's size.
      for (const [first, last] of await sourcedRanges(this.ds, d.id, BATCH_BLOCKS)) {
        const todo = await stillSourced(this.ds, d.id, first, last);
        if (!todo.length) continue;
        ctx.checkCancelled();
        ctx.visit(todo.length);
        try {
          await this.volumes.putBlocks(job.projectId, d.id, this.blocks(job.projectId, todo), { fill: { restores: d.restores }, bypassCache: true });
        } catch (err) {
          if (err instanceof ChunkError) throw new JobFailure(FailureCode.CORRUPT_CHUNK, await this.damaged(d.id, err));
          if (err instanceof DiskReplacedError) {
            if (err.gone) break; // deleted: nothing left to hydrate
            throw new JobFailure(FailureCode.INTERRUPTED, `disk ${d.name} was restored while it was hydrated; hydrateDisk hydrates it from what it was restored from`);
          }
          throw err;
        }
        done += todo.length * BLOCK_SIZE;
        await ctx.progress(done, total);
      }
      // Every block the source holds is the disk's own now (the source never changes): it is a clone no more.
      await ctx.commit(async (em) => {
        if ((await this.pending(d.id, em)) > 0) return;
        await em.query(`UPDATE disks SET clone_backup_id = NULL, clone_image_id = NULL, clone_image_disk_id = NULL, clone_manifest_id = NULL WHERE id = $1`, [d.id]);
      });
    }
  }

  /**
   * The message of a hydration that met a damaged chunk, which backup or image it comes
   * from (a backup is marked ERROR with it, as verification would). The disk stays in use:
   * that block fails to read until it is written.
   */
  private async damaged(diskId: string, err: ChunkError): Promise<string> {
    const [src] = await rows<{ backup_id: string | null; backup: string | null; image: string | null }>(
      this.ds,
      `SELECT d.clone_backup_id AS backup_id, b.name AS backup, i.name AS image FROM disks d
         LEFT JOIN backups b ON b.id = d.clone_backup_id LEFT JOIN images i ON i.id = d.clone_image_id WHERE d.id = $1`,
      [diskId],
    );
    const tail = "the disk is in use as it was, and the damaged block fails to read until it is written";
    if (src?.backup_id) {
      const message = `backup ${src.backup} is damaged (${err.message}); it is marked ERROR; ${tail}`;
      await backupStatus.markCorrupt(this.ds, src.backup_id, message);
      return message;
    }
    return `${src?.image ? `image ${src.image}` : "the disk's source"} is damaged (${err.message}); ${tail}`;
  }

  /** Blocks of the disk still read from its source. */
  private async pending(diskId: string, q: Queryable = this.ds): Promise<number> {
    return (await hydrationOf(q, diskId)).bytesInVault / BLOCK_SIZE;
  }

  /** The source's chunks of these blocks, as batches of whole blocks; blocks with the same bytes share one chunk. */
  private async *blocks(projectId: string, todo: { index: number; hash: Buffer }[]): AsyncIterable<BlockBatch> {
    const takers = new Map<string, { hash: Buffer; indexes: number[] }>();
    for (const t of todo) {
      const key = hex(t.hash);
      const taker = takers.get(key);
      if (taker) taker.indexes.push(t.index);
      else takers.set(key, { hash: t.hash, indexes: [t.index] });
    }
    for await (const run of this.vault.readRuns(
      projectId,
      [...takers.values()].map((t) => t.hash),
    )) {
      const indexes: number[] = [];
      const slots: number[] = [];
      run.hashes.forEach((h, k) => {
        for (const i of takers.get(hex(h))!.indexes) {
          indexes.push(i);
          slots.push(k);
        }
      });
      yield { data: run.data, hashes: Buffer.concat(run.hashes), indexes, slots, release: () => this.vault.codec.buffers.give(run.data) };
    }
  }

  async cleanup(job: JobOf<HydrateJobType>, outcome: JobOutcome): Promise<void> {
    // A hydration stopped half way leaves the disk whole and in use: what it copied stays, the rest reads from the source.
    if ("plan" in job.payload) return this.copy.cleanup(job, outcome);
  }
}
