import { Job, JobStatus } from "../entities";
import type { EventBus, JobEvent } from "../jobs/events";
import type { RequestContext } from "./context";
import { notFound } from "./errors";
import { decodeId } from "./global-id";
import { jobConditions, type JobFilter } from "./job.service";
import { fromGlobalId } from "./global-id";

export interface ProgressEvent {
  job: Job;
  progress: number;
  bytesDone: number;
  bytesTotal: number;
  status: JobStatus;
  etaSeconds: number | null;
}

const TERMINAL = new Set([JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED]);

export function etaSeconds(job: Job, now = Date.now()): number | null {
  if (job.status !== JobStatus.RUNNING || !job.startedAt || job.bytesDone <= 0 || job.bytesTotal <= job.bytesDone) return null;
  const elapsed = (now - job.startedAt.getTime()) / 1000;
  return Math.max(0, Math.round(((job.bytesTotal - job.bytesDone) * elapsed) / job.bytesDone));
}

const toEvent = (job: Job): ProgressEvent => ({
  job,
  progress: job.progress,
  bytesDone: job.bytesDone,
  bytesTotal: job.bytesTotal,
  status: job.status,
  etaSeconds: etaSeconds(job),
});

/**
 * Turns the project's job events into an async stream. It subscribes before the
 * caller reads the current state, so nothing falls between; events that arrive
 * faster than the client reads are coalesced to the latest.
 */
async function* events(bus: EventBus, projectId: string, accept: (e: JobEvent) => boolean): AsyncGenerator<JobEvent, void, undefined> {
  const queue: JobEvent[] = [];
  let wake: (() => void) | null = null;
  const unsubscribe = bus.subscribe(projectId, (e) => {
    if (!accept(e)) return;
    const i = queue.findIndex((q) => q.jobId === e.jobId);
    if (i >= 0) queue.splice(i, 1);
    queue.push(e);
    wake?.();
  });
  try {
    for (;;) {
      while (queue.length) yield queue.shift()!;
      await new Promise<void>((resolve) => (wake = resolve));
      wake = null;
    }
  } finally {
    unsubscribe();
  }
}

/** Streams a job's progress: its state now, every change, the terminal state, then the end. */
export class ProgressService {
  constructor(private readonly bus: EventBus) {}

  private async fresh(ctx: RequestContext, jobId: string): Promise<Job | null> {
    // A new loader per event: the row changed since the last one.
    ctx.invalidate();
    return ctx.loaders.job.load(jobId);
  }

  async *job(ctx: RequestContext, globalId: string): AsyncGenerator<ProgressEvent> {
    const id = decodeId(globalId, "Job", "jobId");
    const stream = events(this.bus, ctx.projectId, (e) => e.jobId === id);
    try {
      const first = stream.next(); // subscribes now
      const job = await this.fresh(ctx, id);
      if (!job) throw notFound("job", globalId);
      yield toEvent(job);
      if (TERMINAL.has(job.status)) return;
      for (let next = await first; !next.done; next = await stream.next()) {
        const now = await this.fresh(ctx, id);
        if (!now) return;
        yield toEvent(now);
        if (TERMINAL.has(now.status)) return;
      }
    } finally {
      await stream.return(undefined);
    }
  }

  /** A backup's progress: the job now acting on it (backup, restore, verify, delete) until that job ends. */
  async *backup(ctx: RequestContext, globalId: string): AsyncGenerator<ProgressEvent> {
    const id = decodeId(globalId, "Backup", "backupId");
    const stream = events(this.bus, ctx.projectId, (e) => e.backupId === id);
    try {
      const first = stream.next();
      const backup = await ctx.loaders.backup.load(id);
      if (!backup) throw notFound("backup", globalId);
      const latest = await ctx.ds.getRepository(Job).findOne({ where: { backupId: id, projectId: ctx.projectId }, order: { createdAt: "DESC" } });
      if (latest) {
        yield toEvent(latest);
        if (TERMINAL.has(latest.status)) return;
      }
      for (let next = await first; !next.done; next = await stream.next()) {
        const now = await this.fresh(ctx, next.value.jobId);
        if (!now) continue;
        yield toEvent(now);
        if (TERMINAL.has(now.status)) return;
      }
    } finally {
      await stream.return(undefined);
    }
  }

  /** Every change of every job of the project that matches the filter; never ends by itself. */
  async *updates(ctx: RequestContext, filter: JobFilter | null | undefined): AsyncGenerator<Job> {
    jobConditions(filter); // validates the filter up front
    const resource = filter?.resourceId ? fromGlobalId(filter.resourceId)?.id : null;
    const stream = events(this.bus, ctx.projectId, () => true);
    try {
      for await (const e of stream) {
        const job = await this.fresh(ctx, e.jobId);
        if (!job) continue;
        if (filter?.statuses?.length && !filter.statuses.includes(job.status)) continue;
        if (filter?.types?.length && !filter.types.includes(job.type)) continue;
        if (resource && ![job.serverId, job.diskId, job.backupId, job.imageId, job.policyId, job.exportId].includes(resource)) continue;
        yield job;
      }
    } finally {
      await stream.return(undefined);
    }
  }
}
