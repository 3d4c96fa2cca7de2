import path from "node:path";
import { Worker } from "node:worker_threads";
import { ScheduleError } from "./schedule";

/**
 * Schedule arithmetic off the event loop. Checking a schedule and finding its next
 * occurrence cost milliseconds per rule, but a schedule may hold 24 rules, many
 * policies may be due at once, and a busy machine stretches each: on the loop, that
 * time is taken from every request. So the API and the scheduler ask one worker
 * thread, which computes for everyone in turn; a computation that runs past its
 * budget costs the worker its life (it is replaced) and the caller a ScheduleError,
 * so no rule can hold the thread either.
 */

/** Longest one computation may run before it is abandoned as too costly. */
const BUDGET_MS = 5_000;

type Request = { op: "check"; rules: string[] } | { op: "next"; rules: string[]; tz: string; after: number; anchor: number };
type Reply = { id: number; ok: true; value: unknown } | { id: number; ok: false; index: number; message: string } | { id: number; ok: false; crash: string };

interface Pending {
  request: Request;
  resolve(value: unknown): void;
  reject(err: Error): void;
}

/**
 * The worker's body. Under ts-node (the sources run directly, and in tests) the
 * worker registers it for itself; a compiled build requires plain JavaScript.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
if (workerData.tsconfig) require(workerData.tsNode).register({ project: workerData.tsconfig, transpileOnly: true, files: false });
const schedule = require(workerData.schedule);
parentPort.on("message", ({ id, request }) => {
  try {
    const value = request.op === "check"
      ? schedule.checkSchedule(request.rules)
      : schedule.nextOccurrence(request.rules, request.tz, new Date(request.after), new Date(request.anchor))?.getTime() ?? null;
    parentPort.postMessage({ id, ok: true, value });
  } catch (err) {
    parentPort.postMessage(err instanceof schedule.ScheduleError
      ? { id, ok: false, index: err.index, message: err.message }
      : { id, ok: false, crash: err instanceof Error ? err.message : String(err) });
  }
});
`;

function workerData(): Record<string, string | null> {
  const schedule = path.join(__dirname, `schedule${path.extname(__filename)}`);
  if (path.extname(__filename) !== ".ts") return { schedule, tsconfig: null, tsNode: null };
  return { schedule, tsconfig: path.join(__dirname, "..", "..", "tsconfig.json"), tsNode: require.resolve("ts-node") };
}

export class ScheduleThread {
  private worker: Worker | null = null;
  private queue: Pending[] = [];
  private current: { id: number; pending: Pending; timer: NodeJS.Timeout } | null = null;
  private nextId = 1;

  constructor(private readonly budgetMs = BUDGET_MS) {}

  /** checkSchedule's answer: the rules as stored, or a ScheduleError naming the rule. */
  check(rules: string[]): Promise<string[]> {
    return this.ask({ op: "check", rules }) as Promise<string[]>;
  }

  /** nextOccurrence's answer. */
  async next(rules: string[], tz: string, after: Date, anchor: Date): Promise<Date | null> {
    const ms = (await this.ask({ op: "next", rules, tz, after: after.getTime(), anchor: anchor.getTime() })) as number | null;
    return ms === null ? null : new Date(ms);
  }

  /** Ends the worker; later requests start another. */
  async close(): Promise<void> {
    const worker = this.worker;
    this.worker = null;
    if (worker) await worker.terminate();
  }

  private ask(request: Request): Promise<unknown> {
    return new Promise((resolve, reject) => {
      this.queue.push({ request, resolve, reject });
      this.pump();
    });
  }

  private spawn(): Worker {
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: workerData() });
    // An idle worker keeps no process alive.
    worker.unref();
    worker.on("message", (reply: Reply) => this.settle(worker, reply));
    worker.on("error", (err) => this.lose(worker, new Error(`schedule worker failed: ${err.message}`)));
    worker.on("exit", (code) => this.lose(worker, new Error(`schedule worker exited (${code})`)));
    return worker;
  }

  private pump(): void {
    if (this.current || !this.queue.length) return;
    const pending = this.queue.shift()!;
    const worker = (this.worker ??= this.spawn());
    const id = this.nextId++;
    // The first request also pays for the worker's start.
    const timer = setTimeout(() => this.overrun(worker), this.budgetMs + (this.nextId === 2 ? 30_000 : 0));
    this.current = { id, pending, timer };
    worker.ref();
    worker.postMessage({ id, request: pending.request });
  }

  private finish(): Pending | null {
    const current = this.current;
    if (!current) return null;
    clearTimeout(current.timer);
    this.current = null;
    this.worker?.unref();
    return current.pending;
  }

  private settle(worker: Worker, reply: Reply): void {
    if (worker !== this.worker || reply.id !== this.current?.id) return;
    const pending = this.finish()!;
    if (reply.ok) pending.resolve(reply.value);
    else if ("crash" in reply) pending.reject(new Error(`schedule computation failed: ${reply.crash}`));
    else pending.reject(new ScheduleError(reply.index, reply.message));
    this.pump();
  }

  /** A computation past its budget: the worker is replaced and the caller told the schedule is too costly. */
  private overrun(worker: Worker): void {
    if (worker !== this.worker) return;
    const pending = this.finish();
    this.worker = null;
    void worker.terminate();
    // Which rule is to blame is not known: the error names the whole schedule (index -1).
    pending?.reject(new ScheduleError(-1, `takes longer than ${this.budgetMs / 1000} s to compute; simplify the rules`));
    this.pump();
  }

  private lose(worker: Worker, err: Error): void {
    if (worker !== this.worker) return;
    this.worker = null;
    const pending = this.finish();
    pending?.reject(err);
    this.pump();
  }
}

/** The process's schedule thread. */
export const scheduleThread = new ScheduleThread();
