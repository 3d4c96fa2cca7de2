import type { DataSource } from "typeorm";
import { FailureCode, type JobOf } from "../../domain/jobs";
import * as backupStatus from "../../domain/status/backup";
import { Backup, JobType } from "../../entities";
import { countRecordedBlocks, dataRanges, resolveManifest } from "../../storage/manifest";
import { ChunkError, type Vault } from "../../storage/vault";
import { BLOCK_SIZE } from "../../storage/volume-store";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";

const READ_BATCH = 128;

const REPORT = 5;

/**
 * Re-reads every chunk a backup needs and re-hashes it. Missing or corrupt
 * chunks fail the job with the blocks they belong to, and mark the backup ERROR
 * so nothing restores from it.
 */
export class VerifyHandler implements JobHandler<JobType.VERIFY_BACKUP> {
  readonly type = JobType.VERIFY_BACKUP;

  constructor(
    private readonly ds: DataSource,
    private readonly vault: Vault,
  ) {}

  async run(ctx: JobContext<JobType.VERIFY_BACKUP>): Promise<void> {
    const { job } = ctx;
    const repo = this.ds.getRepository(Backup);
    const top = await repo.findOneByOrFail({ id: job.backupId });
    const children = await repo.find({ where: { parentId: top.id }, order: { device: "ASC" } });
    const parts = children.length ? children : [top];
    // The work is the blocks the backups record, in ranges that skip what they do not.
    const ranges = new Map<string, [number, number][]>();
    for (const part of parts) ranges.set(part.id, await dataRanges(this.ds, { backupId: part.id }));
    const recorded = await countRecordedBlocks(
      this.ds,
      parts.map((p) => p.id),
    );
    const total = recorded * BLOCK_SIZE;
    await ctx.progress(0, total);
    let done = 0;
    let checked = 0;
    const problems: string[] = [];
    let bad = 0;
    for (const part of parts) {
      for (const [first, last] of ranges.get(part.id)!) {
        ctx.checkCancelled();
        const entries = (await resolveManifest(this.ds, part.id, first, last)).filter((e) => e.hash);
        for (let i = 0; i < entries.length; i += READ_BATCH) {
          ctx.checkCancelled();
          const slice = entries.slice(i, i + READ_BATCH);
          try {
            await this.vault.readChunks(
              job.projectId,
              slice.map((e) => e.hash!),
              { sha256: true },
            );
          } catch (err) {
            if (!(err instanceof ChunkError)) throw err;
            // Find every bad chunk of the batch, one by one.
            for (const e of slice) {
              try {
                await this.vault.readChunks(job.projectId, [e.hash!], { sha256: true });
              } catch (one) {
                if (!(one instanceof ChunkError)) throw one;
                bad++;
                if (problems.length < REPORT) problems.push(`${part.name} block ${e.index} (bytes ${e.index * BLOCK_SIZE}-${(e.index + 1) * BLOCK_SIZE - 1}): ${one.message}`);
              }
            }
          }
          checked += slice.length;
          ctx.visit(slice.length);
          done += slice.length * BLOCK_SIZE;
          await ctx.progress(done, total);
        }
      }
    }
    if (bad) {
      const message = `${bad} of ${checked} chunks failed verification: ${problems.join("; ")}${bad > problems.length ? "; …" : ""}`;
      await ctx.commit((em) => backupStatus.markCorrupt(em, top.id, message));
      throw new JobFailure(FailureCode.VERIFY_FAILED, message);
    }
    await ctx.commit((em) => backupStatus.markVerified(em, top.id));
  }

  async cleanup(_job: JobOf<JobType.VERIFY_BACKUP>, _outcome: JobOutcome): Promise<void> {
    // Verification changes nothing unless it finds damage, which run() records itself.
  }
}
