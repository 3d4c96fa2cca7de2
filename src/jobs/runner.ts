import crypto from "node:crypto";
import os from "node:os";
import type { DataSource, EntityManager } from "typeorm";
import { isDatabaseUnavailable } from "../db/errors";
import { Job, JobStatus, JobType as JobTypes, type JobType } from "../entities";
import { DomainError, type ErrorCode } from "../domain/errors";
import { FailureCode, type JobOf } from "../domain/jobs";
import * as backupStatus from "../domain/status/backup";
import * as jobStatus from "../domain/status/job";
import type { Logger, LogLevel } from "../logger";
import { processAlive } from "../processes";
import { isNoSpace } from "../storage/free-space";
import type { EventBus } from "./events";

export class JobCancelled extends Error {
  constructor() {
    super("the job was cancelled");
  }
}

export class JobInterrupted extends Error {
  constructor(reason: string) {
    super(reason);
  }
}

/** What a handler receives while its job runs: the job, its payload typed by its type. */
export interface JobContext<T extends JobType = JobType> {
  readonly job: JobOf<T>;
  readonly signal: AbortSignal;
  /**
   * Records progress; throws JobCancelled once cancellation was asked for. The
   * runner writes and publishes it several times a second, whatever the handler
   * is doing meanwhile.
   */
  progress(bytesDone: number, bytesTotal: number): Promise<void>;
  /** Throws JobCancelled or JobInterrupted when the job must stop. */
  checkCancelled(): void;
  /** Counts blocks the job read, wrote, hashed or enumerated: its work, which must grow with the data it moves. */
  visit(blocks: number): void;
  /**
   * Runs `fn` in a transaction that first makes sure this process still holds the
   * job (it is RUNNING here, with this attempt), locking its row: a process that lost
   * its claim while it was frozen or cut off commits nothing (JobLost) and stops.
   * Every commit that makes a job's result visible goes through here.
   */
  commit<T>(fn: (em: EntityManager) => Promise<T>): Promise<T>;
}

/** This process no longer holds the job: another one ended it meanwhile. Nothing is committed or cleaned up. */
export class JobLost extends Error {
  constructor() {
    super("the job was ended by another process while this one held it");
  }
}

export interface JobOutcome {
  status: JobStatus.FAILED | JobStatus.CANCELLED;
  /** A job failure's code, or the code of a domain error (a rule the job met, such as NO_SPACE). */
  code: FailureCode | ErrorCode;
  message: string;
}

/** Runs the jobs of type T (or of the types T names). */
export interface JobHandler<T extends JobType = JobType> {
  readonly type: T;
  run(ctx: JobContext<T>): Promise<void>;
  /** Puts what the job touched back into a consistent state after it failed, was cancelled or was interrupted. */
  cleanup(job: JobOf<T>, outcome: JobOutcome): Promise<void>;
}

export interface RunnerOptions {
  concurrency?: number;
  /** How often a running job says it is alive. */
  heartbeatMs?: number;
  /** A running job silent for this long belongs to a dead process. */
  staleMs?: number;
  pollMs?: number;
  progressIntervalMs?: number;
}

/** What a job's start and end lines say; the logger writes the resource keys as global IDs. */
function jobLine(job: Job): Record<string, unknown> {
  return {
    job: job.id,
    type: job.type,
    status: job.status,
    project: job.projectId,
    server: job.serverId ?? undefined,
    disk: job.diskId ?? undefined,
    backup: job.backupId ?? undefined,
    image: job.imageId ?? undefined,
    policy: job.policyId ?? undefined,
    export: job.exportId ?? undefined,
    bytesDone: job.bytesDone,
    bytesTotal: job.bytesTotal,
    blocksVisited: job.blocksVisited,
    durationMs: job.startedAt && job.finishedAt ? job.finishedAt.getTime() - job.startedAt.getTime() : undefined,
    attempt: job.attempts,
    worker: job.workerId,
    error: job.errorCode ? { code: job.errorCode, message: job.errorMessage } : undefined,
  };
}

/** The job with its payload typed by its type: the payload was typed when the job was enqueued (NewJob). */
const typed = (job: Job): JobOf<JobType> => job as JobOf<JobType>;

/** Failures ask for attention (a bug, INTERNAL, most); a cancelled job is someone's choice. */
const endLevel = (job: Job): LogLevel => (job.status !== JobStatus.FAILED ? "info" : job.errorCode === FailureCode.INTERNAL ? "error" : "warn");

/**
 * Runs queued jobs: claims them from Postgres with FOR UPDATE SKIP LOCKED, so any
 * number of processes can share the queue and each job runs once; keeps a
 * heartbeat; fails the jobs of processes that died, calling their handler's
 * cleanup; and publishes every change.
 */
export class JobRunner {
  readonly workerId = `${os.hostname()}:${process.pid}:${crypto.randomBytes(3).toString("hex")}`;
  private readonly handlers = new Map<JobType, JobHandler>();
  private readonly running = new Map<string, AbortController>();
  private timer: NodeJS.Timeout | null = null;
  private recoverTimer: NodeJS.Timeout | null = null;
  private stopped = true;
  private claiming = false;
  private unsubscribe: (() => void) | null = null;
  private readonly opts: Required<RunnerOptions>;
  private readonly settled = new Set<Promise<void>>();

  constructor(
    private readonly ds: DataSource,
    private readonly events: EventBus,
    private readonly logger: Logger,
    handlers: JobHandler[],
    opts: RunnerOptions = {},
  ) {
    for (const h of handlers) {
      if (this.handlers.has(h.type)) throw new Error(`two handlers for job type ${h.type}`);
      this.handlers.set(h.type, h);
    }
    const missing = Object.values(JobTypes).filter((t) => !this.handlers.has(t));
    if (missing.length) throw new Error(`no handler for job type ${missing.join(", ")}`);
    this.opts = { concurrency: 2, heartbeatMs: 2000, staleMs: 30_000, pollMs: 1000, progressIntervalMs: 200, ...opts };
  }

  handledTypes(): JobType[] {
    return [...this.handlers.keys()];
  }

  /**
   * Starts claiming jobs. With `clusterStartedHere` (this process started the
   * database server, so no other process was connected to it), every job that was
   * RUNNING before the server started is failed at once, whoever held it.
   */
  async start(opts: { clusterStartedHere?: boolean } = {}): Promise<void> {
    this.stopped = false;
    this.unsubscribe = this.events.subscribeAll((e) => {
      if (e.status === JobStatus.QUEUED) this.wake();
    });
    await this.recover(opts);
    this.recoverTimer = setInterval(() => void this.recover().catch((err) => this.logger.error("job recovery failed", { error: err })), this.opts.staleMs / 2);
    this.timer = setInterval(() => this.wake(), this.opts.pollMs);
    this.wake();
  }

  /** Stops claiming, interrupts the jobs running here and waits for their handlers to finish. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.unsubscribe?.();
    if (this.timer) clearInterval(this.timer);
    if (this.recoverTimer) clearInterval(this.recoverTimer);
    for (const ctrl of this.running.values()) ctrl.abort(new JobInterrupted("the service stopped while the job ran"));
    await Promise.allSettled([...this.settled]);
  }

  /** Claims queued jobs up to the concurrency limit. */
  wake(): void {
    if (this.stopped || this.claiming) return;
    this.claiming = true;
    void (async () => {
      try {
        while (!this.stopped && this.running.size < this.opts.concurrency) {
          const job = await this.claim();
          if (!job) break;
          const done = this.execute(job).finally(() => this.settled.delete(done));
          this.settled.add(done);
        }
      } catch (err) {
        // While the database is down or restarting this repeats every poll: it is the database's failure, not ours.
        if (isDatabaseUnavailable(err)) this.logger.warn("claiming jobs failed: the database is unavailable", { error: (err as Error).message });
        else this.logger.error("claiming jobs failed", { error: err });
      } finally {
        this.claiming = false;
      }
    })();
  }

  private async claim(): Promise<Job | null> {
    const job = await jobStatus.claimNext(this.ds, this.workerId, this.handledTypes());
    if (!job) return null;
    this.logger.info("job started", jobLine(job));
    await this.publish(job);
    return job;
  }

  private async execute(job: Job): Promise<void> {
    const handler = this.handlers.get(job.type)!;
    const ctrl = new AbortController();
    this.running.set(job.id, ctrl);
    let cancelRequested = job.cancelRequested;
    const claim: jobStatus.Claim = { id: job.id, workerId: this.workerId, attempts: job.attempts };
    // What the handler reported; written and published by a timer, so events keep coming while a phase reports nothing.
    const seen = { done: 0, total: 0, visited: 0 };
    const written = { done: -1, total: -1, visited: -1 };
    let flushing: Promise<void> | null = null;
    const heartbeat = setInterval(
      () => {
        void jobStatus
          .beat(this.ds, job.id)
          .then((cancel) => {
            if (cancel) {
              cancelRequested = true;
              ctrl.abort(new JobCancelled());
            }
          })
          .catch(() => undefined);
      },
      Math.min(this.opts.heartbeatMs, 500),
    );

    const check = () => {
      if (cancelRequested) throw new JobCancelled();
      if (ctrl.signal.aborted) throw ctrl.signal.reason instanceof Error ? ctrl.signal.reason : new JobInterrupted("interrupted");
    };
    const flush = async (announce = true) => {
      if (seen.done === written.done && seen.total === written.total && seen.visited === written.visited) return;
      const { done, total, visited } = seen;
      Object.assign(written, seen);
      const progress = total > 0 ? Math.min(1, done / total) : 0;
      const cancel = await jobStatus.recordProgress(this.ds, claim, { progress, done, total, visited });
      if (cancel === null) {
        // Ended elsewhere (failed by another process while this one was frozen): stop at the next check.
        ctrl.abort(new JobLost());
        return;
      }
      if (job.backupId) await backupStatus.recordProgress(this.ds, job.backupId, progress);
      Object.assign(job, { progress, bytesDone: done, bytesTotal: total, blocksVisited: visited });
      if (announce) await this.publish(job);
      if (cancel && !cancelRequested) {
        cancelRequested = true;
        ctrl.abort(new JobCancelled());
      }
    };
    const ticker = setInterval(() => {
      flushing ??= flush()
        .catch((err) => this.logger.warn("recording a job's progress failed", { job: job.id, error: err }))
        .finally(() => (flushing = null));
    }, this.opts.progressIntervalMs);
    const ctx: JobContext = {
      job: typed(job),
      signal: ctrl.signal,
      checkCancelled: check,
      visit: (blocks) => {
        seen.visited += blocks;
      },
      commit: (fn) =>
        this.ds.transaction(async (em) => {
          if (!(await jobStatus.hold(em, claim))) throw new JobLost();
          return fn(em);
        }),
      progress: async (bytesDone, bytesTotal) => {
        check();
        seen.total = Math.max(0, bytesTotal);
        seen.done = Math.min(Math.max(0, bytesDone), seen.total);
      },
    };

    // The numbers of the job's end go with its terminal status, written once every flush is through.
    const settle = async () => {
      clearInterval(ticker);
      await flushing;
      // A job shorter than a tick still shows what it moved; its end, published next, announces it.
      await flush(false).catch((err) => this.logger.warn("recording a job's progress failed", { job: job.id, error: err }));
      job.blocksVisited = seen.visited;
    };
    try {
      check();
      await handler.run(ctx);
      await settle();
      await this.finish(job, { status: JobStatus.SUCCEEDED });
    } catch (err) {
      await settle();
      if (err instanceof JobLost || ctrl.signal.reason instanceof JobLost) {
        // The job's end belongs to the process that ended it; this one touches nothing more.
        this.logger.warn("a job lost its claim and stopped without committing", { job: job.id, type: job.type, worker: this.workerId });
        return;
      }
      const outcome = this.outcomeOf(err, job);
      try {
        await handler.cleanup(typed(job), outcome);
      } catch (cleanupErr) {
        this.logger.error("job cleanup failed", { job: job.id, type: job.type, error: cleanupErr });
      }
      await this.finish(job, outcome).catch((e) => this.logger.error("recording a job's end failed", { job: job.id, error: e }));
    } finally {
      clearInterval(ticker);
      clearInterval(heartbeat);
      this.running.delete(job.id);
      this.wake();
    }
  }

  private outcomeOf(err: unknown, job: Job): JobOutcome {
    if (err instanceof JobCancelled) return { status: JobStatus.CANCELLED, code: FailureCode.CANCELLED, message: "the job was cancelled" };
    if (err instanceof JobInterrupted) return { status: JobStatus.FAILED, code: FailureCode.INTERRUPTED, message: err.message };
    if (err instanceof DomainError) return { status: JobStatus.FAILED, code: err.code, message: err.message };
    if (err instanceof JobFailure) return { status: JobStatus.FAILED, code: err.code, message: err.message };
    if (isDatabaseUnavailable(err)) {
      this.logger.warn("a job stopped: the database became unavailable", { job: job.id, type: job.type, error: err });
      return { status: JobStatus.FAILED, code: FailureCode.INTERRUPTED, message: "the database became unavailable while the job ran; it can run again" };
    }
    if (isNoSpace(err)) {
      this.logger.warn("a job ran out of space", { job: job.id, type: job.type, error: err });
      return { status: JobStatus.FAILED, code: FailureCode.NO_SPACE, message: "the storage ran out of space; what the job had written was removed, and it can run again once space is free" };
    }
    this.logger.error("job failed", { job: job.id, type: job.type, error: err });
    return { status: JobStatus.FAILED, code: FailureCode.INTERNAL, message: "the job failed unexpectedly; the service log has the details" };
  }

  private async finish(job: Job, outcome: { status: JobStatus; code?: FailureCode | ErrorCode; message?: string }): Promise<void> {
    const ended = await jobStatus.end(this.ds, { id: job.id, workerId: this.workerId, attempts: job.attempts }, outcome, job.blocksVisited ?? 0);
    // A terminal status never changes: a job another process ended meanwhile keeps its end.
    if (!ended) {
      this.logger.warn("a job lost its claim before it could end here", { job: job.id, type: job.type, worker: this.workerId });
      return;
    }
    Object.assign(job, ended);
    this.logger[endLevel(job)]("job ended", jobLine(job));
    await this.publish(job);
  }

  /**
   * Fails the running jobs of processes that stopped: silent too long, or dead on
   * this host; and this process's own jobs that it no longer runs and that last
   * beat before the database server (re)started (their end was lost with it).
   * With `clusterStartedHere`, every job that last beat before the server started.
   */
  async recover(opts: { clusterStartedHere?: boolean } = {}): Promise<number> {
    const candidates = await jobStatus.running(this.ds, this.opts.staleMs / 1000);
    const host = os.hostname();
    const dead = candidates.filter((c) => {
      if (this.running.has(c.id)) return false;
      if (c.stale) return true;
      if (c.before_start && (opts.clusterStartedHere || c.worker_id === this.workerId)) return true;
      const [h, pid] = (c.worker_id ?? "").split(":");
      return h === host && c.worker_id !== null && !c.worker_id.startsWith(this.workerId) && !processAlive(Number(pid));
    });
    for (const c of dead) {
      // This process's own: it lost the database, and with it the job, while it ran.
      const message = c.worker_id === this.workerId ? "the database restarted while the job ran" : "the process running the job stopped before it finished";
      const job = await jobStatus.failInterrupted(this.ds, c.id, message);
      if (!job) continue;
      const handler = this.handlers.get(job.type);
      try {
        await handler?.cleanup(typed(job), { status: JobStatus.FAILED, code: FailureCode.INTERRUPTED, message: job.errorMessage ?? "interrupted" });
      } catch (err) {
        this.logger.error("cleanup of an interrupted job failed", { job: job.id, error: err });
      }
      this.logger[endLevel(job)]("job ended", { ...jobLine(job), recoveredBy: this.workerId });
      await this.publish(job);
    }
    return dead.length;
  }

  private async publish(job: Job): Promise<void> {
    await this.events
      .publish({ projectId: job.projectId, jobId: job.id, backupId: job.backupId, status: job.status })
      .catch((err) => this.logger.warn("publishing a job event failed", { error: err }));
  }
}

/** A failure a handler reports with a code and a message for the user. */
export class JobFailure extends Error {
  constructor(
    readonly code: FailureCode,
    message: string,
  ) {
    super(message);
  }
}
