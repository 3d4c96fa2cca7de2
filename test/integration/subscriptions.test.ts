/**
 * Subscriptions over graphql-ws on /graphql, against the whole service in-process:
 * jobProgress, backupProgress and jobUpdated while real backups run, project
 * scoping, cancelJob seen through a subscription, and a refused bad key.
 */
import crypto from "node:crypto";
import { createClient, type Client } from "graphql-ws";
import WebSocket from "ws";
import { Job } from "../../src/entities";
import { fromGlobalId, toGlobalId } from "../../src/services/global-id";
import { backup, createDisk, succeed, waitJob, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

jest.setTimeout(120_000);

/** Deterministic, incompressible bytes (AES-256-CTR keystream), fast enough for hundreds of MiB. */
function randomBytes(n: number, seed: number): Buffer {
  const key = crypto.createHash("sha256").update(`subscriptions:${seed}`).digest();
  const cipher = crypto.createCipheriv("aes-256-ctr", key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(n)), cipher.final()]);
}

/** Fills a disk with random bytes, 64 MiB per request. */
async function fillDisk(svc: TestService, diskId: string, size: number, seed: number): Promise<void> {
  const piece = 64 * MiB;
  for (let off = 0; off < size; off += piece) await writeDisk(svc, diskId, randomBytes(Math.min(piece, size - off), seed * 1000 + off / piece), off);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const EVENT = `status progress bytesDone bytesTotal etaSeconds job { id type status }`;
const JOB_PROGRESS = `subscription ($id: ID!) { jobProgress(jobId: $id) { ${EVENT} } }`;
const BACKUP_PROGRESS = `subscription ($id: ID!) { backupProgress(backupId: $id) { ${EVENT} } }`;
const JOB_UPDATED = `subscription ($f: JobFilter) { jobUpdated(filter: $f) { id type status progress bytesDone } }`;

interface ProgressEvent {
  status: string;
  progress: number;
  bytesDone: number;
  bytesTotal: number;
  etaSeconds: number | null;
  job: { id: string; type: string; status: string };
  /** When the client received it (ms since epoch). */
  at: number;
}

/** What one subscription received, and how it ended. */
interface Recording<T> {
  events: T[];
  errors: unknown[];
  completed: boolean;
  /** Resolves when the subscription completes or fails. */
  ended: Promise<void>;
  /** Resolves with the first event matching `pred` (already received or later). */
  until(pred: (e: T) => boolean, timeoutMs?: number): Promise<T>;
  stop(): void;
}

function record<T>(client: Client, query: string, variables: Record<string, unknown>, field: string): Recording<T> {
  const events: T[] = [];
  const errors: unknown[] = [];
  const waiters: { pred: (e: T) => boolean; resolve: (e: T) => void }[] = [];
  let endResolve!: () => void;
  const ended = new Promise<void>((r) => (endResolve = r));
  const rec: Recording<T> = {
    events,
    errors,
    completed: false,
    ended,
    until(pred, timeoutMs = 30_000) {
      const found = events.find(pred);
      if (found) return Promise.resolve(found);
      return new Promise<T>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no matching ${field} event within ${timeoutMs} ms; got ${JSON.stringify(events)} errors ${JSON.stringify(errors)}`)), timeoutMs);
        waiters.push({ pred, resolve: (e) => (clearTimeout(timer), resolve(e)) });
      });
    },
    stop: () => undefined,
  };
  rec.stop = client.subscribe(
    { query, variables },
    {
      next: (r) => {
        if (r.errors?.length) errors.push(...r.errors);
        const value = (r.data as Record<string, unknown> | null | undefined)?.[field];
        if (value === undefined || value === null) return;
        const e = { ...(value as object), at: Date.now() } as T;
        events.push(e);
        for (const w of [...waiters]) {
          if (w.pred(e)) {
            waiters.splice(waiters.indexOf(w), 1);
            w.resolve(e);
          }
        }
      },
      error: (err) => {
        errors.push(err);
        endResolve();
      },
      complete: () => {
        rec.completed = true;
        endResolve();
      },
    },
  );
  return rec;
}

function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p.finally(() => clearTimeout(timer)), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms)))]);
}

let svc: TestService;
const clients: Client[] = [];

function wsClient(authorization: string | undefined, opts: { onClosed?: (event: unknown) => void } = {}): Client {
  const client = createClient({
    url: svc.url.replace(/^http/, "ws") + "/graphql",
    webSocketImpl: WebSocket,
    lazy: true,
    retryAttempts: 0,
    shouldRetry: () => false,
    connectionParams: authorization === undefined ? {} : { authorization },
    on: opts.onClosed ? { closed: opts.onClosed } : undefined,
  });
  clients.push(client);
  return client;
}

const alpha = () => wsClient(`Bearer ${svc.keys.alpha}`);
const beta = () => wsClient(`Bearer ${svc.keys.beta}`);

beforeAll(async () => {
  // Progress is written every 20 ms (200 by default), so even a short job shows several steps.
  svc = await startTestService({}, { progressIntervalMs: 20 });
});

afterAll(async () => {
  for (const c of clients) await c.dispose();
  await svc?.stop();
});

/** Asserts the shape every progress stream must have: monotonic bytes, a terminal last event, completion. */
function expectWellFormed(rec: Recording<ProgressEvent>, jobId: string, terminal: string) {
  expect(rec.errors).toEqual([]);
  expect(rec.completed).toBe(true);
  expect(rec.events.length).toBeGreaterThan(0);
  for (const e of rec.events) expect(e.job.id).toBe(jobId);
  for (let i = 1; i < rec.events.length; i++) expect(rec.events[i].bytesDone).toBeGreaterThanOrEqual(rec.events[i - 1].bytesDone);
  const last = rec.events[rec.events.length - 1];
  expect(last.status).toBe(terminal);
  // Only the last event is terminal.
  expect(rec.events.filter((e) => ["SUCCEEDED", "FAILED", "CANCELLED"].includes(e.status))).toHaveLength(1);
}

describe("jobProgress", () => {
  it("streams a backup's progress: current state first, growing bytesDone, RUNNING events in between, SUCCEEDED with progress 1, then completes", async () => {
    // Large enough that the backup runs well over half a second (about 300 MiB/s of random data here).
    const size = 384 * MiB;
    const disk = await createDisk(svc, "progress-disk", size);
    await fillDisk(svc, disk, size, 1);

    const client = alpha();
    const { jobId } = await backup(svc, disk);
    const rec = record<ProgressEvent>(client, JOB_PROGRESS, { id: jobId }, "jobProgress");
    await within(rec.ended, 60_000, "jobProgress never completed");
    const job = await waitJob(svc, jobId);

    expectWellFormed(rec, jobId, "SUCCEEDED");
    // The current state comes first, before the job ends (an ended job's state alone: the next test).
    const first = rec.events[0];
    expect(["QUEUED", "RUNNING"]).toContain(first.status);

    const last = rec.events[rec.events.length - 1];
    expect(last.progress).toBe(1);
    expect(last.bytesTotal).toBe(size);
    expect(last.bytesDone).toBe(size);
    expect(last.job.status).toBe("SUCCEEDED");
    expect(job.status).toBe("SUCCEEDED");

    const running = rec.events.filter((e) => e.status === "RUNNING" && e.progress > 0 && e.progress < 1);
    const runningMs = last.at - rec.events.find((e) => e.status === "RUNNING")!.at;
    // The runner publishes at most every 200 ms; a job of more than half a second shows several steps.
    expect(runningMs).toBeGreaterThan(500);
    expect(running.length).toBeGreaterThanOrEqual(2);
    for (const e of running) {
      expect(e.bytesTotal).toBe(size);
      expect(e.progress).toBeCloseTo(e.bytesDone / e.bytesTotal, 5);
    }
    // Progress itself never goes back either.
    for (let i = 1; i < rec.events.length; i++) expect(rec.events[i].progress).toBeGreaterThanOrEqual(rec.events[i - 1].progress);
    console.info(`jobProgress: ${rec.events.length} events (${running.length} RUNNING with 0 < progress < 1) over ${runningMs} ms of a ${size / MiB} MiB backup`);
  });

  it("answers a job that has already ended with its final state and completes", async () => {
    const disk = await createDisk(svc, "ended-disk", 4 * MiB);
    await fillDisk(svc, disk, 4 * MiB, 2);
    const { jobId } = await backup(svc, disk);
    await succeed(svc, jobId);
    const rec = record<ProgressEvent>(alpha(), JOB_PROGRESS, { id: jobId }, "jobProgress");
    await within(rec.ended, 10_000, "jobProgress of an ended job never completed");
    expectWellFormed(rec, jobId, "SUCCEEDED");
    expect(rec.events).toHaveLength(1);
    expect(rec.events[0].progress).toBe(1);
  });
});

/** How many listeners the service's event bus holds for a project (internals: nothing else shows a subscription is listening, or a leaked one). */
const listeners = (projectId: string): number => (svc.services.progress as any).bus.local.emitter.listenerCount(projectId);

async function waitFor(pred: () => boolean, ms: number, what: string): Promise<number> {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(10);
  }
  return Date.now() - t0;
}

describe("backupProgress", () => {
  it("follows the backup job to SUCCEEDED, completes, and the backup is AVAILABLE by then", async () => {
    const size = 96 * MiB;
    const disk = await createDisk(svc, "backup-progress-disk", size);
    await fillDisk(svc, disk, size, 3);
    // The job waits until the subscription listens: a backup this size can finish
    // before a subscription made after the mutation is set up.
    await svc.runner.stop();
    const before = listeners(svc.projectIds.alpha);
    const { backupId, jobId } = await backup(svc, disk);
    const rec = record<ProgressEvent>(alpha(), BACKUP_PROGRESS, { id: backupId }, "backupProgress");
    await waitFor(() => listeners(svc.projectIds.alpha) > before, 5_000, "backupProgress never subscribed to the bus");
    await svc.runner.start();
    await within(rec.ended, 60_000, "backupProgress never completed");
    expectWellFormed(rec, jobId, "SUCCEEDED");
    const last = rec.events[rec.events.length - 1];
    expect(last.progress).toBe(1);
    expect(last.job.type).toBe("BACKUP");
    expect(rec.events.some((e) => e.status === "RUNNING" && e.progress > 0 && e.progress < 1)).toBe(true);
    const b = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status progress } } }`, { id: backupId });
    expect(b.node).toEqual({ status: "AVAILABLE", progress: 1 });
  });
});

describe("jobUpdated", () => {
  it("streams the changes of BACKUP jobs only, while a VERIFY_BACKUP job runs too", async () => {
    const small = await createDisk(svc, "verify-me", 32 * MiB);
    await fillDisk(svc, small, 32 * MiB, 4);
    const { backupId: toVerify, jobId: firstJob } = await backup(svc, small);
    await succeed(svc, firstJob);

    const size = 96 * MiB;
    const disk = await createDisk(svc, "updated-disk", size);
    await fillDisk(svc, disk, size, 5);

    const client = alpha();
    const backups = record<any>(client, JOB_UPDATED, { f: { types: ["BACKUP"] } }, "jobUpdated");
    const everything = record<any>(client, JOB_UPDATED, {}, "jobUpdated");

    const { jobId } = await backup(svc, disk);
    await backups.until((j) => j.id === jobId && j.status === "RUNNING" && j.progress > 0, 30_000);
    const verify = (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: toVerify })).verifyBackup.job.id;
    await succeed(svc, verify);
    await succeed(svc, jobId);
    await backups.until((j) => j.id === jobId && j.status === "SUCCEEDED", 10_000);
    await everything.until((j) => j.id === verify && j.status === "SUCCEEDED", 10_000);
    await everything.until((j) => j.id === jobId && j.status === "SUCCEEDED", 10_000);
    backups.stop();
    everything.stop();

    expect(backups.errors).toEqual([]);
    expect(everything.errors).toEqual([]);
    // The unfiltered stream did see the verify job, so its absence below is the filter's doing.
    expect(everything.events.filter((j) => j.id === verify).length).toBeGreaterThan(0);
    expect(backups.events.length).toBeGreaterThan(0);
    for (const j of backups.events) expect(j.type).toBe("BACKUP");
    expect(backups.events.map((j) => j.id)).not.toContain(verify);
    const mine = backups.events.filter((j) => j.id === jobId);
    expect(mine.map((j) => j.status)).toEqual(expect.arrayContaining(["RUNNING", "SUCCEEDED"]));
    // Several progress changes of the one job arrive, in order.
    expect(mine.filter((j) => j.status === "RUNNING").length).toBeGreaterThanOrEqual(2);
    for (let i = 1; i < mine.length; i++) expect(mine[i].bytesDone).toBeGreaterThanOrEqual(mine[i - 1].bytesDone);
    expect(mine[mine.length - 1].status).toBe("SUCCEEDED");
  });
});

describe("one read per event", () => {
  it("reads the job of an event once for all its subscribers, and the rows they select from it once too", async () => {
    const disk = await createDisk(svc, "shared-read-disk", MiB);
    await writeDisk(svc, disk, randomBytes(MiB, 7));
    const { jobId } = await backup(svc, disk);
    await succeed(svc, jobId);
    const job = await svc.ds.getRepository(Job).findOneByOrFail({ id: fromGlobalId(jobId)!.id });

    await sleep(300); // the job's own last events are out
    const backupId = toGlobalId("Backup", job.backupId!);

    // Two documents, both reading the job's backup.
    const queries = [`subscription { jobUpdated { id status backup { id status } } }`, `subscription { jobUpdated(filter: { types: [BACKUP] }) { id status backup { id status name } } }`];
    const project = svc.projectIds.alpha;
    const base = listeners(project);
    const betaBase = listeners(svc.projectIds.beta);
    const n = 24;
    const connections = [alpha(), alpha(), alpha()];
    const recs = Array.from({ length: n }, (_, i) => record<any>(connections[i % connections.length], queries[i % 2], {}, "jobUpdated"));
    const other = record<any>(beta(), queries[0], {}, "jobUpdated");
    await waitFor(() => listeners(project) === base + n && listeners(svc.projectIds.beta) === betaBase + 1, 10_000, "the subscriptions never subscribed to the bus");

    // One event of the job, heard by every subscriber of the project.
    const { statements } = await svc.countQueries(async () => {
      await svc.services.queue.announce(job);
      await Promise.all(recs.map((r) => r.until((j) => j.id === jobId, 10_000)));
    });
    const reads = (table: string) => statements.filter((sql) => sql.trimStart().startsWith("SELECT") && new RegExp(`FROM "?${table}"? `).test(sql)).length;
    expect(reads("jobs")).toBe(1);
    expect(reads("backups")).toBe(1);
    for (const [i, r] of recs.entries()) {
      expect(r.errors).toEqual([]);
      expect(r.events).toEqual([{ id: jobId, status: "SUCCEEDED", backup: { id: backupId, status: "AVAILABLE", ...(i % 2 ? { name: expect.any(String) } : {}) }, at: expect.any(Number) }]);
    }
    await sleep(200);
    expect(other.events).toEqual([]); // the other project's subscriber hears nothing of it
    for (const r of [...recs, other]) r.stop();
  });
});

describe("project scoping", () => {
  it("refuses another project's job with NOT_FOUND, and another project's jobUpdated hears nothing of it", async () => {
    const size = 64 * MiB;
    const disk = await createDisk(svc, "scoped-disk", size);
    await fillDisk(svc, disk, size, 6);

    const betaClient = beta();
    const betaUpdates = record<any>(betaClient, JOB_UPDATED, {}, "jobUpdated");
    // The beta stream is live before alpha's job starts: a job of beta's own arrives on it.
    const betaDisk = (await svc.ok(`mutation { createDisk(input: { name: "beta-disk", sizeBytes: 1048576 }) { disk { id } } }`, {}, svc.keys.beta)).createDisk.disk.id;
    const betaBackup = async () => (await svc.ok(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { job { id } } }`, { r: betaDisk }, svc.keys.beta)).createBackup.job.id as string;
    const probe = await betaBackup();
    await betaUpdates.until((j) => j.id === probe && j.status === "SUCCEEDED", 30_000);
    const heardBefore = betaUpdates.events.length;

    const { jobId, backupId } = await backup(svc, disk);
    const stolen = record<ProgressEvent>(betaClient, JOB_PROGRESS, { id: jobId }, "jobProgress");
    await within(stolen.ended, 10_000, "beta's jobProgress of alpha's job neither failed nor completed");
    const stolenBackup = record<ProgressEvent>(betaClient, BACKUP_PROGRESS, { id: backupId }, "backupProgress");
    await within(stolenBackup.ended, 10_000, "beta's backupProgress of alpha's backup neither failed nor completed");
    await succeed(svc, jobId);
    await sleep(500);

    for (const rec of [stolen, stolenBackup]) {
      expect(rec.events).toEqual([]);
      expect(rec.completed).toBe(false);
      const errs = rec.errors as { message?: string; extensions?: { code?: string } }[][];
      // graphql-ws hands the sink's error() the GraphQL errors of an operation the server refused.
      expect(Array.isArray(errs[0])).toBe(true);
      expect(errs[0][0].extensions?.code).toBe("NOT_FOUND");
    }
    expect(betaUpdates.errors).toEqual([]);
    // Nothing arrived while alpha's job ran, and nothing of it ever.
    expect(betaUpdates.events.length).toBe(heardBefore);
    expect(betaUpdates.events.every((j) => j.id === probe)).toBe(true);
    // ...while beta's own jobs still do.
    const after = await betaBackup();
    await betaUpdates.until((j) => j.id === after && j.status === "SUCCEEDED", 30_000);
    expect(betaUpdates.events.every((j) => j.id === probe || j.id === after)).toBe(true);
    betaUpdates.stop();
  });
});

describe("cancelJob", () => {
  it("cancels a running backup within a second; the backup ends ERROR, never AVAILABLE", async () => {
    const size = 512 * MiB;
    const disk = await createDisk(svc, "cancel-disk", size);
    await fillDisk(svc, disk, size, 7);

    const { jobId, backupId } = await backup(svc, disk);
    const rec = record<ProgressEvent>(alpha(), JOB_PROGRESS, { id: jobId }, "jobProgress");
    const seen = await rec.until((e) => e.status === "RUNNING" && e.progress > 0, 30_000);
    expect(seen.progress).toBeLessThan(0.5);

    // Watch the backup's status from now on: it must never read AVAILABLE.
    const statuses = new Set<string>();
    let watching = true;
    const watcher = (async () => {
      while (watching) {
        statuses.add((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status } } }`, { id: backupId })).node.status);
        await sleep(20);
      }
    })();

    const t0 = Date.now();
    const cancel = await svc.gql(`mutation ($id: ID!) { cancelJob(input: { id: $id }) { job { id } } }`, { id: jobId });
    expect(cancel.errors).toBeUndefined();
    expect(cancel.data.cancelJob.job.id).toBe(jobId);
    const end = await rec.until((e) => ["SUCCEEDED", "FAILED", "CANCELLED"].includes(e.status), 10_000);
    const ms = end.at - t0;
    await within(rec.ended, 5_000, "jobProgress did not complete after the job was cancelled");
    watching = false;
    await watcher;

    expect(end.status).toBe("CANCELLED");
    expect(ms).toBeLessThan(1000);
    expect(end.progress).toBeLessThan(1);
    expectWellFormed(rec, jobId, "CANCELLED");

    const job = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Job { status error { code } } } }`, { id: jobId });
    expect(job.node).toEqual({ status: "CANCELLED", error: { code: "CANCELLED" } });
    await sleep(300);
    const after = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status completedAt } } }`, { id: backupId });
    expect(after.node).toEqual({ status: "ERROR", completedAt: null });
    expect(statuses.has("AVAILABLE")).toBe(false);
    // The resource is free again: a new backup is accepted (and cancelled at once).
    const again = await backup(svc, disk);
    await svc.ok(`mutation ($id: ID!) { cancelJob(input: { id: $id }) { job { id } } }`, { id: again.jobId });
    expect((await waitJob(svc, again.jobId)).status).toBe("CANCELLED");
    console.info(`cancelJob: CANCELLED ${ms} ms after the call, at progress ${end.progress.toFixed(3)}`);
  });
});

describe("ending a subscription", () => {
  it("frees the server side at once when the client unsubscribes or disconnects, even when no event comes", async () => {
    const project = svc.projectIds.alpha;
    const base = listeners(project);
    const client = alpha();
    const rec = record<any>(client, JOB_UPDATED, {}, "jobUpdated");
    await waitFor(() => listeners(project) === base + 1, 5_000, "jobUpdated never subscribed to the bus");
    rec.stop();
    await waitFor(() => listeners(project) === base, 1_000, "an unsubscribed jobUpdated kept listening");

    const other = alpha();
    record<any>(other, JOB_UPDATED, { f: { types: ["RESTORE"] } }, "jobUpdated");
    record<any>(other, JOB_UPDATED, {}, "jobUpdated");
    await waitFor(() => listeners(project) === base + 2, 5_000, "the two subscriptions never subscribed to the bus");
    await other.dispose();
    await waitFor(() => listeners(project) === base, 1_000, "subscriptions of a closed socket kept listening");
  });
});

describe("authentication over graphql-ws", () => {
  it("refuses a connection with a bad key", async () => {
    let closeCode: number | undefined;
    const client = wsClient("Bearer stw_not_a_real_key_0000000000000000", { onClosed: (e) => (closeCode = (e as { code?: number }).code) });
    const rec = record<ProgressEvent>(client, JOB_UPDATED, {}, "jobUpdated");
    await within(rec.ended, 10_000, "a bad key's subscription was neither refused nor completed");
    expect(rec.events).toEqual([]);
    expect(rec.completed).toBe(false);
    expect((rec.errors[0] as { code?: number }).code).toBe(4403);
    expect(closeCode).toBe(4403);
  });
});
