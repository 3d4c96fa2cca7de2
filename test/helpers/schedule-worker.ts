import path from "node:path";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";

/**
 * Runs schedule checks in a worker thread under a watchdog: a rule that sends the
 * computation into a synchronous loop (as rrule does on some steps) fails the test,
 * naming the rule, instead of hanging jest with it.
 */

export interface ScheduleJob {
  schedule: string[];
  /**
   * "parse": parseRule on the first rule; "full": checkSchedule, then nextOccurrence
   * after `at`; "occurrences": occurrencesBetween `at` and `to`.
   */
  mode: "parse" | "full" | "occurrences";
  tz: string;
  at: string;
  to?: string;
  /** The policy's creation, where INTERVAL counts from; `at` when not given. */
  anchor?: string;
}

export type ScheduleResult = { ms: number } & (
  { ok: true; rule?: unknown; stored?: string[]; next?: string | null; occurrences?: string[] } | { ok: false; index: number; message: string } | { crash: string }
);

function runJobs(jobs: ScheduleJob[], progress: Int32Array): ScheduleResult[] {
  // Loaded here, inside the worker, through ts-node.
  const { checkSchedule, nextOccurrence, occurrencesBetween, parseRule, ScheduleError } = require("../../src/domain/schedule") as typeof import("../../src/domain/schedule");
  return jobs.map((job, i) => {
    Atomics.store(progress, 0, i);
    const started = performance.now();
    let result: ScheduleResult;
    try {
      const at = new Date(job.at);
      const anchor = new Date(job.anchor ?? job.at);
      if (job.mode === "parse") {
        result = { ok: true, rule: parseRule(job.schedule[0], 0), ms: 0 };
      } else if (job.mode === "occurrences") {
        result = { ok: true, occurrences: occurrencesBetween(job.schedule, job.tz, at, new Date(job.to!), anchor).map((d) => d.toISOString()), ms: 0 };
      } else {
        const stored = checkSchedule(job.schedule);
        result = { ok: true, stored, next: nextOccurrence(stored, job.tz, at, anchor)?.toISOString() ?? null, ms: 0 };
      }
    } catch (err) {
      result = err instanceof ScheduleError ? { ok: false, index: err.index, message: err.message, ms: 0 } : { crash: err instanceof Error ? (err.stack ?? err.message) : String(err), ms: 0 };
    }
    result.ms = performance.now() - started;
    return result;
  });
}

if (!isMainThread && workerData?.scheduleJobs) {
  const progress = new Int32Array(workerData.progress as SharedArrayBuffer);
  parentPort!.postMessage(runJobs(workerData.scheduleJobs as ScheduleJob[], progress));
}

/** Runs the jobs in a worker; rejects, naming the job, when one runs longer than `jobMs`. */
export function runScheduleJobs(jobs: ScheduleJob[], jobMs: number): Promise<ScheduleResult[]> {
  const progress = new SharedArrayBuffer(4);
  const index = new Int32Array(progress);
  Atomics.store(index, 0, -1);
  const root = path.join(__dirname, "..", "..");
  const boot = `require(${JSON.stringify(require.resolve("ts-node"))}).register({ project: ${JSON.stringify(path.join(root, "tsconfig.json"))}, transpileOnly: true, files: false });
require(${JSON.stringify(__filename)});`;
  const worker = new Worker(boot, { eval: true, workerData: { scheduleJobs: jobs, progress } });
  return new Promise((resolve, reject) => {
    let last = -1;
    let since = Date.now();
    const watchdog = setInterval(() => {
      const now = Atomics.load(index, 0);
      if (now !== last) {
        last = now;
        since = Date.now();
      } else if (Date.now() - since > (now < 0 ? Math.max(jobMs, 60_000) : jobMs)) {
        clearInterval(watchdog);
        void worker.terminate();
        reject(new Error(now < 0 ? "the worker did not start" : `job ${now} ran longer than ${jobMs} ms: ${JSON.stringify(jobs[now])}`));
      }
    }, 100);
    worker.once("message", (results: ScheduleResult[]) => {
      clearInterval(watchdog);
      void worker.terminate();
      resolve(results);
    });
    worker.once("error", (err) => {
      clearInterval(watchdog);
      reject(err);
    });
  });
}
