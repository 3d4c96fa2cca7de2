import { Job, JobStatus } from "../entities";
import type { EventBus, JobEvent } from "../jobs/events";
import { RequestContext } from "./context";
import { HandOut, keepLatest, type Receiver } from "./hand-out";
import { notFound } from "../domain/errors";
import { isTerminal } from "../domain/jobs";
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

/** A stream of job events that can be closed at any moment, even while a read waits. */
interface EventStream extends AsyncIterableIterator<JobEvent> {
  return(): Promise<IteratorResult<JobEvent, undefined>>;
}

/**
 * Turns the project's job events into an async stream. It subscribes at once, so
 * a caller that reads the current state afterwards misses nothing between. Events
 * reach it through the hand-out's rounds; those it has taken but not yet read are
 * coalesced to the latest per job, so a slow reader skips states, never ends behind.
 *
 * Not an async generator on purpose: a generator waiting for the next event cannot
 * be returned until that event comes (its return() queues behind the pending
 * next()), so a subscription to a quiet job or project would never end and never
 * unsubscribe. Here return() ends a pending read at once.
 */
function events(bus: EventBus, handOut: HandOut, projectId: string, accept: (e: JobEvent) => boolean, prepare: (e: JobEvent) => Promise<unknown> | null): EventStream {
  const queue: JobEvent[] = [];
  let waiting: ((r: IteratorResult<JobEvent, undefined>) => void) | null = null;
  const receiver: Receiver = {
    incoming: [],
    closed: false,
    prepare,
    take(taken) {
      for (const e of taken) keepLatest(queue, e);
      if (waiting && queue.length) {
        const w = waiting;
        waiting = null;
        w({ value: queue.shift()!, done: false });
      }
    },
  };
  const unsubscribe = bus.subscribe(projectId, (e) => {
    if (receiver.closed || !accept(e)) return;
    keepLatest(receiver.incoming, e);
    handOut.heard(projectId, receiver);
  });
  const end = { value: undefined, done: true } as const;
  return {
    next() {
      if (queue.length) return Promise.resolve({ value: queue.shift()!, done: false });
      if (receiver.closed) return Promise.resolve(end);
      return new Promise((resolve) => (waiting = resolve));
    },
    return() {
      if (!receiver.closed) {
        receiver.closed = true;
        unsubscribe();
        queue.length = 0;
        receiver.incoming = [];
      }
      const w = waiting;
      waiting = null;
      w?.(end);
      return Promise.resolve(end);
    },
    [Symbol.asyncIterator]() {
      return this;
    },
  };
}

/**
 * Runs a generator that reads job events through `open`, so that returning it (the
 * client unsubscribed or went away) first closes its stream: the generator's pending
 * read ends, it runs its finally, and the return completes instead of waiting for an
 * event that may never come.
 */
function closable<T>(
  events: (accept: (e: JobEvent) => boolean) => EventStream,
  body: (open: (accept: (e: JobEvent) => boolean) => EventStream) => AsyncGenerator<T, void, undefined>,
): AsyncGenerator<T, void, undefined> {
  let stream: EventStream | null = null;
  let returned = false;
  const gen = body((accept) => {
    stream = events(accept);
    if (returned) void stream.return();
    return stream;
  });
  const close = async () => {
    returned = true;
    await stream?.return();
  };
  const wrapped = {
    next: () => gen.next(),
    async return(value) {
      await close();
      return gen.return(value);
    },
    async throw(err) {
      await close();
      return gen.throw(err);
    },
    [Symbol.asyncIterator]() {
      return wrapped;
    },
    async [Symbol.asyncDispose]() {
      await wrapped.return(undefined);
    },
  } as AsyncGenerator<T, void, undefined>;
  return wrapped;
}

/** Streams a job's progress: its state now, every change, the terminal state, then the end. */
export class ProgressService {
  /**
   * What was read after each job event, shared by every subscriber of the event's
   * project: the bus hands all its listeners the same event object, so the job is
   * read once (one SELECT, before the hand-out's round hands the event over) and
   * every subscriber takes that Job and the same loaders for the fields it selects.
   * Each event gets new loaders, as the rows changed since the last; an entry lives
   * as long as its event.
   */
  private readonly afterEvent = new WeakMap<JobEvent, { reader: RequestContext; job: Promise<Job | null> }>();
  /** One ProgressEvent per Job read, so the subscribers of a shared read share the event too (and its execution, see sharedSubscribe). */
  private readonly progressOf = new WeakMap<Job, ProgressEvent>();

  private readonly handOut = new HandOut();

  constructor(private readonly bus: EventBus) {}

  /** A stream of the project's events that `accept` takes, each handed over once its job has been read. */
  private stream(ctx: RequestContext, accept: (e: JobEvent) => boolean): EventStream {
    return events(this.bus, this.handOut, ctx.projectId, accept, (e) => (e.projectId === ctx.projectId ? this.read(ctx, e).job : null));
  }

  /** The job as it is now, read for this subscriber alone. */
  private async fresh(ctx: RequestContext, jobId: string): Promise<Job | null> {
    ctx.invalidate();
    return ctx.loaders.job.load(jobId);
  }

  private sharedEvent(job: Job): ProgressEvent {
    let event = this.progressOf.get(job);
    if (!event) this.progressOf.set(job, (event = toEvent(job)));
    return event;
  }

  /** What is read after an event, once for all the subscribers of the event's project. */
  private read(ctx: RequestContext, event: JobEvent): { reader: RequestContext; job: Promise<Job | null> } {
    let read = this.afterEvent.get(event);
    if (!read) {
      const reader = new RequestContext(ctx.projectId, ctx.ds, ctx.config, ctx.now);
      read = { reader, job: reader.loaders.job.load(event.jobId) };
      this.afterEvent.set(event, read);
    }
    return read;
  }

  /** The job an event is about, read once for all the subscribers of the event's project; `ctx` reads the event's other rows through the same loaders. */
  private async afterRead(ctx: RequestContext, event: JobEvent): Promise<Job | null> {
    if (event.projectId !== ctx.projectId) return this.fresh(ctx, event.jobId); // never shared across projects
    const read = this.read(ctx, event);
    ctx.readFrom(read.reader);
    return read.job;
  }

  job(ctx: RequestContext, globalId: string): AsyncGenerator<ProgressEvent, void, undefined> {
    return closable(
      (accept) => this.stream(ctx, accept),
      (open) => this.jobEvents(ctx, globalId, open),
    );
  }

  private async *jobEvents(ctx: RequestContext, globalId: string, open: (accept: (e: JobEvent) => boolean) => EventStream): AsyncGenerator<ProgressEvent, void, undefined> {
    const id = decodeId(globalId, "Job", "jobId");
    const stream = open((e) => e.jobId === id); // subscribes before the current state is read
    try {
      const job = await this.fresh(ctx, id);
      if (!job) throw notFound("job", globalId);
      yield toEvent(job);
      if (isTerminal(job.status)) return;
      for (let next = await stream.next(); !next.done; next = await stream.next()) {
        const now = await this.afterRead(ctx, next.value);
        if (!now) return;
        yield this.sharedEvent(now);
        if (isTerminal(now.status)) return;
      }
    } finally {
      await stream.return();
    }
  }

  /** A backup's progress: the job now acting on it (backup, restore, verify, delete) until that job ends. */
  backup(ctx: RequestContext, globalId: string): AsyncGenerator<ProgressEvent, void, undefined> {
    return closable(
      (accept) => this.stream(ctx, accept),
      (open) => this.backupEvents(ctx, globalId, open),
    );
  }

  private async *backupEvents(ctx: RequestContext, globalId: string, open: (accept: (e: JobEvent) => boolean) => EventStream): AsyncGenerator<ProgressEvent, void, undefined> {
    const id = decodeId(globalId, "Backup", "backupId");
    const stream = open((e) => e.backupId === id); // subscribes before the current state is read
    try {
      const backup = await ctx.loaders.backup.load(id);
      if (!backup) throw notFound("backup", globalId);
      const latest = await ctx.ds.getRepository(Job).findOne({ where: { backupId: id, projectId: ctx.projectId }, order: { createdAt: "DESC" } });
      if (latest) {
        yield toEvent(latest);
        if (isTerminal(latest.status)) return;
      }
      for (let next = await stream.next(); !next.done; next = await stream.next()) {
        const now = await this.afterRead(ctx, next.value);
        if (!now) continue;
        yield this.sharedEvent(now);
        if (isTerminal(now.status)) return;
      }
    } finally {
      await stream.return();
    }
  }

  /** Every change of every job of the project that matches the filter; never ends by itself. */
  updates(ctx: RequestContext, filter: JobFilter | null | undefined): AsyncGenerator<Job, void, undefined> {
    return closable(
      (accept) => this.stream(ctx, accept),
      (open) => this.jobUpdates(ctx, filter, open),
    );
  }

  private async *jobUpdates(ctx: RequestContext, filter: JobFilter | null | undefined, open: (accept: (e: JobEvent) => boolean) => EventStream): AsyncGenerator<Job, void, undefined> {
    jobConditions(filter); // validates the filter up front
    const resource = filter?.resourceId ? fromGlobalId(filter.resourceId)?.id : null;
    const stream = open(() => true);
    try {
      for await (const e of stream) {
        const job = await this.afterRead(ctx, e);
        if (!job) continue;
        if (filter?.statuses?.length && !filter.statuses.includes(job.status)) continue;
        if (filter?.types?.length && !filter.types.includes(job.type)) continue;
        if (resource && ![job.serverId, job.diskId, job.backupId, job.imageId, job.policyId, job.exportId].includes(resource)) continue;
        yield job;
      }
    } finally {
      await stream.return();
    }
  }
}
