import type { DataSource } from "typeorm";
import { hydrate, rows, type Queryable } from "../../db/sql";
import { Job, JobStatus, type JobType } from "../../entities";
import type { ErrorCode } from "../errors";
import { FailureCode } from "../jobs";

/**
 * Every status change of a job: QUEUED, claimed RUNNING by one process (its
 * `worker_id` and `attempts` fence what that process may still write), then
 * SUCCEEDED, FAILED or CANCELLED, never to change again.
 */

/** Who holds a running job: the process and its attempt. */
export interface Claim {
  id: string;
  workerId: string;
  attempts: number;
}

const HELD = `status = '${JobStatus.RUNNING}' AND worker_id = $2 AND attempts = $3`;

/** Claims the oldest queued job of `types` for `workerId` (FOR UPDATE SKIP LOCKED: each job is claimed once); RUNNING. */
export async function claimNext(ds: DataSource, workerId: string, types: JobType[]): Promise<Job | null> {
  const claimed = await rows(
    ds,
    `UPDATE jobs SET status = '${JobStatus.RUNNING}', started_at = now(), attempts = attempts + 1, worker_id = $1, heartbeat_at = now(), updated_at = now()
      WHERE id = (SELECT id FROM jobs WHERE status = '${JobStatus.QUEUED}' AND type = ANY($2) ORDER BY created_at, id FOR UPDATE SKIP LOCKED LIMIT 1)
      RETURNING *`,
    [workerId, types],
  );
  return claimed.length ? hydrate(ds, Job, claimed)[0] : null;
}

/** The running process is alive; returns whether cancellation was asked for (null when the job is gone). */
export async function beat(q: Queryable, id: string): Promise<boolean | null> {
  const [r] = await rows<{ cancel_requested: boolean }>(q, `UPDATE jobs SET heartbeat_at = now() WHERE id = $1 RETURNING cancel_requested`, [id]);
  return r ? r.cancel_requested : null;
}

/** Records the progress of a job the claim still holds; null when it holds it no more, else whether cancellation was asked for. */
export async function recordProgress(q: Queryable, claim: Claim, p: { progress: number; done: number; total: number; visited: number }): Promise<boolean | null> {
  const [r] = await rows<{ cancel_requested: boolean }>(
    q,
    `UPDATE jobs SET progress = $4, bytes_done = $5, bytes_total = $6, blocks_visited = $7, heartbeat_at = now(), updated_at = now()
      WHERE id = $1 AND ${HELD} RETURNING cancel_requested`,
    [claim.id, claim.workerId, claim.attempts, p.progress, p.done, p.total, p.visited],
  );
  return r ? r.cancel_requested : null;
}

/** Whether the claim still holds the job, locking its row for the rest of the transaction `q`. */
export async function hold(q: Queryable, claim: Claim): Promise<boolean> {
  const held = await rows(q, `UPDATE jobs SET heartbeat_at = now() WHERE id = $1 AND ${HELD} RETURNING id`, [claim.id, claim.workerId, claim.attempts]);
  return held.length > 0;
}

/**
 * Ends a job the claim holds: SUCCEEDED (its progress full), FAILED or CANCELLED
 * with the reason. Returns the job as ended, or null when another process ended it
 * first (a terminal status never changes).
 */
export async function end(ds: DataSource, claim: Claim, outcome: { status: JobStatus; code?: FailureCode | ErrorCode; message?: string }, blocksVisited: number): Promise<Job | null> {
  const succeeded = outcome.status === JobStatus.SUCCEEDED;
  const ended = await rows(
    ds,
    `UPDATE jobs SET status = $4, finished_at = now(), updated_at = now(), error_code = $5, error_message = $6, blocks_visited = $8,
            progress = CASE WHEN $7 THEN 1 ELSE progress END, bytes_done = CASE WHEN $7 THEN bytes_total ELSE bytes_done END
      WHERE id = $1 AND ${HELD} RETURNING *`,
    [claim.id, claim.workerId, claim.attempts, outcome.status, outcome.code ?? null, outcome.message ?? null, succeeded, blocksVisited],
  );
  return ended.length ? hydrate(ds, Job, ended)[0] : null;
}

/** Running jobs, with whether each is silent for `staleSeconds` and whether it last beat before the database server started. */
export async function running(q: Queryable, staleSeconds: number): Promise<{ id: string; worker_id: string | null; stale: boolean; before_start: boolean }[]> {
  return rows(
    q,
    `SELECT id, worker_id, heartbeat_at < now() - make_interval(secs => $1) OR heartbeat_at IS NULL AS stale,
            heartbeat_at < pg_postmaster_start_time() OR heartbeat_at IS NULL AS before_start
       FROM jobs WHERE status = '${JobStatus.RUNNING}'`,
    [staleSeconds],
  );
}

/** A running job whose process stopped, whoever held it: FAILED, INTERRUPTED. Returns it, or null when it had ended already. */
export async function failInterrupted(ds: DataSource, id: string, message: string): Promise<Job | null> {
  const failed = await rows(
    ds,
    `UPDATE jobs SET status = '${JobStatus.FAILED}', finished_at = now(), updated_at = now(), error_code = '${FailureCode.INTERRUPTED}', error_message = $2
      WHERE id = $1 AND status = '${JobStatus.RUNNING}' RETURNING *`,
    [id, message],
  );
  return failed.length ? hydrate(ds, Job, failed)[0] : null;
}

/** Asks a job of the project that has not ended to stop; returns it, or null when it has ended (or is not the project's). */
export async function requestCancel(ds: DataSource, id: string, projectId: string): Promise<Job | null> {
  const [row] = await rows(
    ds,
    `UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = $1 AND project_id = $2 AND status IN ('${JobStatus.QUEUED}', '${JobStatus.RUNNING}') RETURNING *`,
    [id, projectId],
  );
  return row ? hydrate(ds, Job, [row])[0] : null;
}
