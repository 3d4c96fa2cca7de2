import { QueryFailedError, type DataSource } from "typeorm";
import type { Config } from "../config";
import { hydrate, rows } from "../db/sql";
import { Policy, type Job, type PolicyRun } from "../entities";
import type { Logger } from "../logger";
import { RequestContext } from "./context";
import type { JobQueue } from "./job-queue";
import type { PolicyRunner } from "./policy.service";
import { ScheduleError } from "../domain/schedule";
import { scheduleThread } from "../domain/schedule-thread";

export type Clock = () => Date;

/**
 * Fires policies when their schedule says. A tick claims each due policy with
 * FOR UPDATE SKIP LOCKED and, in the same transaction, starts its backups,
 * records the run and moves nextRunAt past now, so each occurrence runs once
 * however many processes tick, a crash leaves either the whole run or none, and
 * occurrences missed while down produce a single catch-up run. Retention follows
 * each run.
 */
export class Scheduler {
  private timer: NodeJS.Timeout | null = null;
  private ticking: Promise<unknown> | null = null;

  constructor(
    private readonly ds: DataSource,
    private readonly config: Config,
    private readonly runner: PolicyRunner,
    private readonly queue: JobQueue,
    private readonly logger: Logger,
    private readonly clock: Clock = () => new Date(),
  ) {}

  start(intervalMs = 5000): void {
    this.timer = setInterval(() => {
      if (this.ticking) return;
      this.ticking = this.tick()
        .catch((err) => this.logger.error("scheduler tick failed", { error: err }))
        .finally(() => (this.ticking = null));
    }, intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.ticking;
  }

  /** Runs every policy due at `now`; returns the runs made. */
  async tick(now: Date = this.clock()): Promise<PolicyRun[]> {
    const runs: PolicyRun[] = [];
    for (;;) {
      const claimed = await this.runner.capture.hold(() =>
        retryDeadlocks(() =>
          this.ds.transaction(async (em) => {
            const due = await rows(em, `SELECT * FROM policies WHERE enabled AND next_run_at <= $1 ORDER BY next_run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED`, [now]);
            if (!due.length) return null;
            const [policy] = hydrate(this.ds, Policy, due);
            const ctx = new RequestContext(policy.projectId, this.ds, this.config, () => now);
            const occurrence = policy.nextRunAt!;
            const { run, jobs } = await this.runner.runIn(em, ctx, policy, "SCHEDULE", occurrence);
            // The next occurrence after now, not after the one served: downtime gives one catch-up run.
            const next = await this.nextRun(policy, now);
            await em.query(`UPDATE policies SET last_run_at = $2, next_run_at = $3, updated_at = now() WHERE id = $1`, [policy.id, occurrence, next]);
            policy.lastRunAt = occurrence;
            policy.nextRunAt = next;
            return { run, jobs, policy, ctx };
          }),
        ),
      );
      if (!claimed) break;
      await this.announce(claimed.jobs);
      runs.push(claimed.run);
      const missed = claimed.run.scheduledFor.getTime() < now.getTime() - 60_000;
      this.logger.info("policy ran", { policy: claimed.policy.id, project: claimed.policy.projectId, backups: claimed.run.backupCount, skipped: claimed.run.skipped.length, catchUp: missed });
      try {
        claimed.run.deletedCount = await this.runner.retain(claimed.ctx, claimed.policy, claimed.run);
      } catch (err) {
        this.logger.error("retention failed", { policy: claimed.policy.id, project: claimed.policy.projectId, error: err });
      }
    }
    return runs;
  }

  /**
   * A schedule stored before its rules were checked as they are now may be refused:
   * that policy stops (until its schedule is updated) instead of failing every tick.
   */
  private async nextRun(policy: Policy, now: Date): Promise<Date | null> {
    try {
      return await scheduleThread.next(policy.schedule, policy.timezone, now, policy.createdAt);
    } catch (err) {
      if (!(err instanceof ScheduleError)) throw err;
      this.logger.error("policy schedule refused; it will not run again until its schedule is updated", { policy: policy.id, rule: err.index, reason: err.message });
      return null;
    }
  }

  private async announce(jobs: Job[]): Promise<void> {
    await this.queue.announce(...jobs);
  }
}

/** Attempts of a policy run that Postgres chose as a deadlock's victim. */
const DEADLOCK_ATTEMPTS = 3;

/**
 * Runs `fn` (one transaction) again when Postgres aborts it to break a deadlock: a policy
 * run locks servers, disks and backups while retention after a policy backup (in the job
 * runner) locks some of the same rows. The aborted transaction left nothing, and the
 * policy is claimed again, so the run still happens exactly once.
 */
async function retryDeadlocks<T>(fn: () => Promise<T>): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      const code = err instanceof QueryFailedError ? (err.driverError as { code?: string }).code : undefined;
      if (code !== "40P01" || attempt >= DEADLOCK_ATTEMPTS) throw err;
    }
  }
}
