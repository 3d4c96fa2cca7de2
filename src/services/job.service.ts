import { JobStatus, JobType, type Job } from "../entities";
import * as jobStatus from "../domain/status/job";
import type { RequestContext } from "./context";
import { badInput, conflict, notFound } from "../domain/errors";
import { decodeId, fromGlobalId } from "./global-id";
import type { JobQueue } from "./job-queue";
import type { Condition, ListSelection, PageArgs } from "./pagination";

export interface JobFilter {
  statuses?: JobStatus[] | null;
  types?: JobType[] | null;
  resourceId?: string | null;
}

const RESOURCE_COLUMN = { Server: "server_id", Disk: "disk_id", Backup: "backup_id", Image: "image_id", Policy: "policy_id", ImageExport: "export_id" } as const;

export function jobConditions(filter: JobFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter.types?.length) out.push({ sql: "t.type = ANY($1)", params: [filter.types] });
  if (filter.resourceId) {
    const parsed = fromGlobalId(filter.resourceId);
    const column = parsed && parsed.type in RESOURCE_COLUMN ? RESOURCE_COLUMN[parsed.type as keyof typeof RESOURCE_COLUMN] : null;
    if (!parsed || !column) throw badInput("filter.resourceId", "not the ID of a server, disk, backup, image, export or policy");
    out.push({ sql: `t.${column} = $1`, params: [parsed.id] });
  }
  return out;
}

export class JobService {
  constructor(private readonly queue: JobQueue) {}

  list(ctx: RequestContext, args: PageArgs & { filter?: JobFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection("jobs", ctx.projectId, args, jobConditions(args.filter), select);
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Job> {
    const job = await ctx.loaders.job.load(decodeId(globalId, "Job", field));
    if (!job) throw notFound("job", globalId);
    return job;
  }

  /**
   * Asks a job to stop. The process running it notices within a second and the
   * job ends CANCELLED after its cleanup; a queued job is cancelled as soon as a
   * runner picks it up, before any work.
   */
  async cancel(ctx: RequestContext, globalId: string): Promise<Job> {
    const id = decodeId(globalId, "Job", "id");
    const job = await jobStatus.requestCancel(ctx.ds, id, ctx.projectId);
    if (!job) {
      const ended = await this.get(ctx, globalId);
      throw conflict(`the job has already ended (${ended.status})`);
    }
    await this.queue.announce(job);
    ctx.invalidate();
    return job;
  }
}
