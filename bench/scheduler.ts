/**
 * Scheduler benchmark: 10,000 resources bound to 100 policies all due at once — the
 * time from the occurrence until every backup job is queued — and the retention pass
 * over 100,000 existing backups. There is no peer program: the table shows Stowage's
 * own times and per-item rates.
 *
 *   npm run bench:scheduler
 *   npm run bench:scheduler -- --resources 2000 --policies 20     # smaller
 *   npm run bench:scheduler -- --cpu-prof                          # also profile this process's CPU per phase
 *   options: --per-disk N (backups per disk for retention, default 10), --days N (spread of their
 *   created_at, default 100), --skip-retain (no full retention pass), --no-history (tick on empty
 *   jobs/backups tables: the first run of a fresh install), --keep (keep the temp dir / database),
 *   --dir DIR (where the temp dir goes; default $TMPDIR)
 *
 * Runs in this process against a real Postgres: the embedded one (like the tests) or
 * DATABASE_URL when set (a database stowage_bench_sched_<pid> is created in it and
 * dropped afterwards). Setup is bulk SQL and not timed: a project, the disks (blank:
 * 1 GiB, nothing written), the policies (FREQ=DAILY at 02:00 UTC; keepDaily 7, keepWeekly 4,
 * maxBackups 5), one binding per disk and the previous day's run (per disk one AVAILABLE
 * backup and its SUCCEEDED job, so the tables hold what a running service's do and the
 * backups are incremental), then ANALYZE. Every policy's next_run_at is set
 * to one instant T and `Scheduler.tick(T + 1 s)` is timed: it claims each policy, creates
 * its backups and BACKUP jobs (QUEUED; no job runner runs, nothing executes), records the
 * run, announces the jobs (pg_notify, as the service's PgEventBus does) and runs the
 * policy's retention. "All queued" is when the last BACKUP job was announced (after its
 * transaction committed); the tick's end includes the retention that follows each run.
 * Then the same from a clean slate with two Schedulers on two DataSources ticking at once.
 * Then retention: the tick's backups and jobs are removed, 10 AVAILABLE POLICY backups per
 * disk are inserted (created_at spread over 100 days), and timed are
 * PolicyRunner.preview() for every policy (the decision pass) and PolicyRunner.retain()
 * for every policy (which enqueues its DELETE_BACKUP jobs in one transaction, by deleteBackup's rules).
 */
import "reflect-metadata";
import fsp from "node:fs/promises";
import { Session } from "node:inspector/promises";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import type { DataSource } from "typeorm";
import { migrate } from "../src/app";
import { loadConfig, type Config } from "../src/config";
import { createDataSource } from "../src/db/data-source";
import { openEmbeddedPostgres, type PostgresHandle } from "../src/db/embedded-postgres";
import { Policy, type Job } from "../src/entities";
import { PgEventBus } from "../src/jobs/events";
import { Scheduler } from "../src/services/scheduler";
import { createLogger, silentLogger } from "../src/logger";
import { createServices, type Services } from "../src/services";
import { RequestContext } from "../src/services/context";
import { int, parseFlags, runBench } from "./lib/cli";
import { profileLines, type Window } from "./lib/cpuprofile";
import { cpuTree, hrSeconds, onInterrupt } from "./lib/proc";
import { fmtInt, log, table, verdict } from "./lib/report";

interface Options {
  resources: number;
  policies: number;
  perDisk: number;
  days: number;
  skipRetain: boolean;
  history: boolean;
  cpuProf: boolean;
  keep: boolean;
  dir: string;
}

function options(argv: string[]): Options {
  const v = parseFlags(__filename, argv, {
    resources: { type: "string" },
    policies: { type: "string" },
    "per-disk": { type: "string" },
    days: { type: "string" },
    "skip-retain": { type: "boolean" },
    "no-history": { type: "boolean" },
    "cpu-prof": { type: "boolean" },
    keep: { type: "boolean" },
    dir: { type: "string" },
  });
  const o: Options = {
    resources: int(v.resources, "--resources", 10_000),
    policies: int(v.policies, "--policies", 100),
    perDisk: int(v["per-disk"], "--per-disk", 10),
    days: int(v.days, "--days", 100),
    skipRetain: v["skip-retain"] ?? false,
    history: !(v["no-history"] ?? false),
    cpuProf: v["cpu-prof"] ?? false,
    keep: v.keep ?? false,
    dir: v.dir ?? os.tmpdir(),
  };
  if (o.resources % o.policies !== 0) throw new Error(`--resources (${o.resources}) must be a multiple of --policies (${o.policies})`);
  return o;
}

const RULES = { maxBackups: 5, keepDaily: 7, keepWeekly: 4 };

/** SQL statements sent, in total and by text (cheap: it runs inside the timed phases). */
class QueryCounter {
  total = 0;
  byShape = new Map<string, number>();
  onQuery = (sql: string) => {
    this.total++;
    this.byShape.set(sql, (this.byShape.get(sql) ?? 0) + 1);
  };
  snapshot(): { total: number; byShape: Map<string, number> } {
    return { total: this.total, byShape: new Map(this.byShape) };
  }
  since(s: { total: number; byShape: Map<string, number> }): { total: number; top: [string, number][] } {
    const diff: [string, number][] = [];
    for (const [k, v] of this.byShape) {
      const d = v - (s.byShape.get(k) ?? 0);
      if (d > 0) diff.push([k, d]);
    }
    diff.sort((a, b) => b[1] - a[1]);
    return { total: this.total - s.total, top: diff.slice(0, 12) };
  }
}

interface Phase {
  label: string;
  seconds: number;
  statements: number;
  topStatements: [string, number][];
  nodeCpu: number;
  /** null with an external DATABASE_URL (its processes are not ours to measure). */
  pgCpu: number | null;
  window: Window;
}

interface Db {
  ds: DataSource;
  url: string;
  counter: QueryCounter;
  events: PgEventBus;
  services: Services;
}

async function openDb(url: string, logger = silentLogger): Promise<Db> {
  const counter = new QueryCounter();
  const ds = createDataSource({ url, logger, onQuery: counter.onQuery });
  await ds.initialize();
  const events = new PgEventBus(url, (sql, params) => ds.query(sql, params), logger);
  await events.start();
  return { ds, url, counter, events, services: createServices(ds, events) };
}

async function closeDb(db: Db): Promise<void> {
  await db.events.close();
  await db.ds.destroy();
}

/** Counts BACKUP jobs as the scheduler announces them (after each run's commit) and when the last one went. */
function watchAnnounces(services: Services) {
  const state = { backupJobs: 0, last: 0 };
  const queue = services.queue;
  const original = queue.announce.bind(queue);
  queue.announce = async (...jobs: Job[]) => {
    await original(...jobs);
    const n = jobs.filter((j) => j.type === "BACKUP").length;
    if (n) {
      state.backupJobs += n;
      state.last = hrSeconds();
    }
  };
  return state;
}

async function main(): Promise<number> {
  const opts = options(process.argv.slice(2));
  const perPolicy = opts.resources / opts.policies;
  const tmp = await fsp.mkdtemp(path.join(opts.dir, "stowage-bench-sched-"));
  await fsp.chmod(tmp, 0o755);
  let pg: PostgresHandle | null = null;
  let adminUrl = process.env.DATABASE_URL;
  const dbName = adminUrl ? `stowage_bench_sched_${process.pid}` : "stowage_bench";
  const opened: Db[] = [];
  let profiler: Session | null = null;
  const cleanup = async () => {
    for (const db of opened.splice(0)) await closeDb(db).catch(() => undefined);
    if (process.env.DATABASE_URL && !opts.keep) {
      const admin = new Client({ connectionString: process.env.DATABASE_URL });
      await admin.connect().catch(() => undefined);
      await admin.query(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`).catch(() => undefined);
      await admin.end().catch(() => undefined);
    }
    await pg?.stop().catch(() => undefined);
    pg = null;
    if (opts.keep) log(`kept ${tmp}${process.env.DATABASE_URL ? ` and database ${dbName}` : ""}`);
    else await fsp.rm(tmp, { recursive: true, force: true });
  };
  onInterrupt(cleanup, log);

  try {
    const loadStart = os.loadavg()[0];
    if (loadStart > os.cpus().length / 2) log(`warning: load average ${loadStart.toFixed(2)} on ${os.cpus().length} CPUs: other work will skew the times`);

    // ---- Postgres and the schema (untimed) -------------------------------------------
    let t = hrSeconds();
    if (!adminUrl) {
      pg = await openEmbeddedPostgres(path.join(tmp, "data"), silentLogger);
      adminUrl = pg.url;
    }
    {
      const admin = new Client({ connectionString: adminUrl });
      await admin.connect();
      await admin.query(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`);
      await admin.query(`CREATE DATABASE ${dbName}`);
      const [{ server_version }] = (await admin.query(`SHOW server_version`)).rows;
      log(`Postgres ${server_version} (${pg ? "embedded" : "DATABASE_URL"}) ready in ${(hrSeconds() - t).toFixed(1)} s`);
      await admin.end();
    }
    const u = new URL(adminUrl);
    u.pathname = `/${dbName}`;
    const url = u.toString();
    const config: Config = loadConfig({ STOWAGE_DATA_DIR: path.join(tmp, "data"), DATABASE_URL: url, LOG_LEVEL: "warn" });
    const logger = createLogger("warn");
    const db = await openDb(url, logger);
    opened.push(db);
    const { ds, services } = db;
    await migrate(ds);
    const { project } = await services.projects.create("bench");
    const projectId = project.id;

    // ---- the fleet: disks, policies, bindings (bulk SQL, untimed) ----------------------
    t = hrSeconds();
    // T: the latest 02:00 UTC at least an hour ago; the policies are older than that.
    const nowMs = Date.now();
    let T = new Date(Date.UTC(new Date(nowMs).getUTCFullYear(), new Date(nowMs).getUTCMonth(), new Date(nowMs).getUTCDate(), 2, 0, 0));
    if (T.getTime() > nowMs - 3_600_000) T = new Date(T.getTime() - 86_400_000);
    const tickAt = new Date(T.getTime() + 1000);
    await ds.query(
      `INSERT INTO policies (project_id, name, enabled, schedule, timezone, max_backups, keep_daily, keep_weekly, next_run_at, created_at)
       SELECT $1, 'policy-' || lpad(i::text, 4, '0'), true, ARRAY['FREQ=DAILY;BYHOUR=2;BYMINUTE=0;BYSECOND=0'], 'UTC', $3, $4, $5, $2, $2::timestamptz - interval '400 days'
         FROM generate_series(1, $6) i`,
      [projectId, T, RULES.maxBackups, RULES.keepDaily, RULES.keepWeekly, opts.policies],
    );
    await ds.query(
      `INSERT INTO disks (project_id, name, type, size_bytes, used_bytes, status, created_at)
       SELECT $1, 'disk-' || lpad(i::text, 6, '0'), 'DATA', 1073741824, 0, 'AVAILABLE', $2::timestamptz - interval '400 days' + i * interval '1 millisecond'
         FROM generate_series(1, $3) i`,
      [projectId, T, opts.resources],
    );
    // Disk n (in name order) goes to policy floor(n / perPolicy).
    await ds.query(
      `INSERT INTO policy_bindings (project_id, policy_id, disk_id)
       SELECT $1, p.id, d.id
         FROM (SELECT id, row_number() OVER (ORDER BY name) - 1 AS n FROM disks WHERE project_id = $1) d
         JOIN (SELECT id, row_number() OVER (ORDER BY name) - 1 AS n FROM policies WHERE project_id = $1) p ON p.n = d.n / $2`,
      [projectId, perPolicy],
    );
    if (opts.history) {
      // The previous occurrence's run: one AVAILABLE backup per disk and its SUCCEEDED job.
      await ds.query(
        `WITH j AS (
           INSERT INTO jobs (project_id, type, status, progress, disk_id, policy_id, created_at, started_at, finished_at)
           SELECT $1, 'BACKUP', 'SUCCEEDED', 1, b.disk_id, b.policy_id, $2::timestamptz - interval '1 day', $2::timestamptz - interval '1 day', $2::timestamptz - interval '1 day' + interval '1 minute'
             FROM policy_bindings b WHERE b.project_id = $1
           RETURNING id, disk_id, policy_id, created_at, finished_at)
         INSERT INTO backups (project_id, name, resource_type, resource_id, resource_name, disk_id, status, trigger, policy_id, job_id,
                              progress, size_bytes, stored_bytes, snapshot_version, disk_size_bytes, disk_type, created_at, completed_at)
         SELECT $1, 'autobk_' || substr(md5(j.id::text), 1, 8), 'DISK', d.id, d.name, d.id, 'AVAILABLE', 'POLICY', j.policy_id, j.id,
                1, 0, 0, 0, d.size_bytes, 'DATA', j.created_at, j.finished_at
           FROM j JOIN disks d ON d.id = j.disk_id`,
        [projectId, T],
      );
      await ds.query(`UPDATE jobs SET backup_id = b.id FROM backups b WHERE b.job_id = jobs.id`);
      await ds.query(`UPDATE policies SET last_run_at = $1::timestamptz - interval '1 day'`, [T]);
    }
    await ds.query(`VACUUM ANALYZE`);
    log(
      `setup: ${fmtInt(opts.resources)} disks, ${opts.policies} policies, ${fmtInt(opts.resources)} bindings${opts.history ? `, the previous day's ${fmtInt(opts.resources)} backups and jobs` : " (no history)"} in ${(hrSeconds() - t).toFixed(1)} s (untimed); occurrence T = ${T.toISOString()}`,
    );

    // ---- measuring helpers ---------------------------------------------------------------
    const phases: Phase[] = [];
    if (opts.cpuProf) {
      profiler = new Session();
      profiler.connect();
      await profiler.post("Profiler.enable");
      await profiler.post("Profiler.setSamplingInterval", { interval: 500 });
      await profiler.post("Profiler.start");
    }
    const measure = async <R>(label: string, counters: QueryCounter[], fn: () => Promise<R>): Promise<{ result: R; phase: Phase }> => {
      const snaps = counters.map((c) => c.snapshot());
      const cpu0 = cpuTree(process.pid);
      const startUs = Number(process.hrtime.bigint() / 1000n);
      const t0 = hrSeconds();
      const result = await fn();
      const seconds = hrSeconds() - t0;
      const endUs = Number(process.hrtime.bigint() / 1000n);
      const cpu1 = cpuTree(process.pid);
      const merged = new Map<string, number>();
      let statements = 0;
      counters.forEach((c, i) => {
        const d = c.since(snaps[i]);
        statements += d.total;
        for (const [k, v] of d.top) {
          const flat = k.replace(/\s+/g, " ").replace(/"/g, "").trim();
          const where = flat.search(/ WHERE /i);
          const shape = flat.length <= 110 ? flat : where > 0 ? `${flat.slice(0, 40)} … ${flat.slice(where + 1, where + 71)}` : flat.slice(0, 110);
          merged.set(shape, (merged.get(shape) ?? 0) + v);
        }
      });
      const phase: Phase = {
        label,
        seconds,
        statements,
        topStatements: [...merged].sort((a, b) => b[1] - a[1]).slice(0, 8),
        nodeCpu: cpu1.self - cpu0.self,
        pgCpu: pg ? cpu1.descendants - cpu0.descendants : null,
        window: { label, startUs, endUs },
      };
      phases.push(phase);
      log(`${label}: ${seconds.toFixed(2)} s, ${fmtInt(statements)} SQL statements`);
      return { result, phase };
    };
    /** Removes what the ticks made (the history stays) and makes every policy due at T again. */
    const resetRuns = async () => {
      await ds.query(`DELETE FROM policy_runs`);
      await ds.query(`DELETE FROM backups WHERE status <> 'AVAILABLE'`);
      await ds.query(`DELETE FROM jobs WHERE status <> 'SUCCEEDED'`);
      await ds.query(`UPDATE policies SET next_run_at = $1, last_run_at = ${opts.history ? "$1::timestamptz - interval '1 day'" : "NULL"}`, [T]);
      await ds.query(`VACUUM ANALYZE policy_runs, backups, backup_blocks, jobs, policies`);
    };
    /** Checks the state a complete tick leaves; returns what it found. */
    const checkTick = async (what: string) => {
      const [{ n: queued }] = await ds.query(`SELECT count(*)::int AS n FROM jobs WHERE type = 'BACKUP' AND status = 'QUEUED'`);
      const [{ n: creating }] = await ds.query(`SELECT count(*)::int AS n FROM backups WHERE status = 'CREATING' AND trigger = 'POLICY' AND parent_id IS NULL`);
      const perPolicyRuns: { runs: number; backups: number; skipped: number }[] = await ds.query(
        `SELECT count(r.id)::int AS runs, coalesce(sum(r.backup_count), 0)::int AS backups, coalesce(sum(jsonb_array_length(r.skipped)), 0)::int AS skipped
           FROM policies p LEFT JOIN policy_runs r ON r.policy_id = p.id AND r.trigger = 'SCHEDULE' GROUP BY p.id`,
      );
      const [{ n: stillDue }] = await ds.query(`SELECT count(*)::int AS n FROM policies WHERE enabled AND next_run_at <= $1`, [tickAt]);
      const onceEach = perPolicyRuns.length === opts.policies && perPolicyRuns.every((p) => p.runs === 1 && p.backups === perPolicy && p.skipped === 0);
      const problems: string[] = [];
      if (queued !== opts.resources) problems.push(`${queued} QUEUED BACKUP jobs, expected ${opts.resources}`);
      if (creating !== opts.resources) problems.push(`${creating} CREATING policy backups, expected ${opts.resources}`);
      if (!onceEach) {
        const runs = perPolicyRuns.map((p) => p.runs);
        problems.push(`policy runs per policy: min ${Math.min(...runs)}, max ${Math.max(...runs)}; skipped ${perPolicyRuns.reduce((n, p) => n + p.skipped, 0)}`);
      }
      if (stillDue) problems.push(`${stillDue} policies still due after the tick`);
      if (problems.length) throw new Error(`${what}: ${problems.join("; ")}`);
      log(`${what} verified: ${fmtInt(queued)} QUEUED BACKUP jobs, ${opts.policies} policies ran exactly once each (${perPolicy} backups, nothing skipped)`);
      return { queued };
    };

    // ---- warm-up (untimed): one policy due, so the code paths are compiled as in a running service
    await resetRuns();
    await ds.query(`UPDATE policies SET next_run_at = next_run_at + interval '1 day' WHERE id <> (SELECT id FROM policies ORDER BY name LIMIT 1)`);
    t = hrSeconds();
    await new Scheduler(ds, config, services.policyRuns, services.queue, logger, () => tickAt).tick(tickAt);
    log(`warm-up tick (one policy, ${perPolicy} jobs): ${(hrSeconds() - t).toFixed(2)} s (untimed)`);

    // ---- 1. one scheduler, all policies due at once -----------------------------------------
    await resetRuns();
    const seen1 = watchAnnounces(services);
    const scheduler = new Scheduler(ds, config, services.policyRuns, services.queue, logger, () => tickAt);
    const one = await measure("tick, one scheduler", [db.counter], async () => {
      const t0 = hrSeconds();
      const runs = await scheduler.tick(tickAt);
      return { runs, queuedS: seen1.last - t0 };
    });
    if (one.result.runs.length !== opts.policies) throw new Error(`the tick made ${one.result.runs.length} runs, expected ${opts.policies}`);
    if (seen1.backupJobs !== opts.resources) throw new Error(`the tick announced ${seen1.backupJobs} BACKUP jobs, expected ${opts.resources}`);
    await checkTick("one scheduler");

    // ---- 2. two schedulers (two DataSources) ticking at once -------------------------------
    await resetRuns();
    const db2 = await openDb(url, logger);
    opened.push(db2);
    const seenA = watchAnnounces(services);
    const seenB = watchAnnounces(db2.services);
    const schedA = new Scheduler(ds, config, services.policyRuns, services.queue, logger, () => tickAt);
    const schedB = new Scheduler(db2.ds, config, db2.services.policyRuns, db2.services.queue, logger, () => tickAt);
    seenA.backupJobs = seenB.backupJobs = 0;
    const two = await measure("tick, two schedulers at once", [db.counter, db2.counter], async () => {
      const t0 = hrSeconds();
      const [a, b] = await Promise.all([schedA.tick(tickAt), schedB.tick(tickAt)]);
      return { a, b, queuedS: Math.max(seenA.last, seenB.last) - t0 };
    });
    const runsA = two.result.a.length;
    const runsB = two.result.b.length;
    if (runsA + runsB !== opts.policies) throw new Error(`the two ticks made ${runsA} + ${runsB} runs, expected ${opts.policies} in all`);
    const ranTwice = new Set(two.result.a.map((r) => r.policyId)).size + new Set(two.result.b.map((r) => r.policyId)).size - new Set([...two.result.a, ...two.result.b].map((r) => r.policyId)).size;
    if (ranTwice) throw new Error(`${ranTwice} policies ran in both schedulers`);
    await checkTick("two schedulers");
    opened.splice(opened.indexOf(db2), 1);
    await closeDb(db2);

    // ---- 3. retention over the existing backups ---------------------------------------------
    // A clean slate (the history too): exactly the backups below exist.
    await ds.query(`DELETE FROM policy_runs`);
    await ds.query(`DELETE FROM backups`);
    await ds.query(`DELETE FROM jobs`);
    await ds.query(`VACUUM ANALYZE jobs, policy_runs`);
    t = hrSeconds();
    const totalBackups = opts.resources * opts.perDisk;
    // Backup k (0 = newest) of disk n: (k + (n mod 10) / 10) × (days / perDisk) days and (n mod 7) hours before T.
    const step = opts.days / opts.perDisk;
    await ds.query(
      `INSERT INTO backups (project_id, name, resource_type, resource_id, resource_name, disk_id, status, trigger, policy_id,
                            progress, size_bytes, stored_bytes, snapshot_version, disk_size_bytes, disk_type, created_at, completed_at)
       SELECT $1, 'autobk_' || substr(md5(d.id::text || k::text), 1, 8), 'DISK', d.id, d.name, d.id, 'AVAILABLE', 'POLICY', b.policy_id,
              1, 0, 0, 0, d.size_bytes, 'DATA', x.ts, x.ts + interval '1 minute'
         FROM (SELECT id, name, size_bytes, row_number() OVER (ORDER BY name) AS n FROM disks WHERE project_id = $1) d
         JOIN policy_bindings b ON b.disk_id = d.id
         CROSS JOIN generate_series(0, $2 - 1) k
         CROSS JOIN LATERAL (SELECT $3::timestamptz - ((k + (d.n % 10) / 10.0) * $4::float8) * interval '1 day' - (d.n % 7) * interval '1 hour' AS ts) x`,
      [projectId, opts.perDisk, T, step],
    );
    await ds.query(`VACUUM ANALYZE backups`);
    const [{ n: inserted }] = await ds.query(`SELECT count(*)::int AS n FROM backups WHERE status = 'AVAILABLE'`);
    if (inserted !== totalBackups) throw new Error(`inserted ${inserted} backups, expected ${totalBackups}`);
    log(`inserted ${fmtInt(totalBackups)} AVAILABLE POLICY backups (${opts.perDisk} per disk over ${opts.days} days) in ${(hrSeconds() - t).toFixed(1)} s (untimed)`);

    const policies = await ds.getRepository(Policy).find({ where: { projectId }, order: { name: "ASC" } });
    const ctxFor = () => new RequestContext(projectId, ds, config, () => tickAt);
    const prev = await measure("retention preview, all policies", [db.counter], async () => {
      let keep = 0;
      let drop = 0;
      for (const p of policies) {
        for (const d of await services.policyRuns.preview(ctxFor(), p)) {
          if (d.keep) keep++;
          else drop++;
        }
      }
      return { keep, drop };
    });
    if (prev.result.keep + prev.result.drop !== totalBackups) throw new Error(`the previews decided on ${prev.result.keep + prev.result.drop} backups, expected ${totalBackups}`);

    let retain: { result: number; phase: Phase } | null = null;
    if (!opts.skipRetain) {
      retain = await measure("retention retain, all policies", [db.counter], async () => {
        let deleted = 0;
        for (const p of policies) deleted += await services.policyRuns.retain(ctxFor(), p);
        return deleted;
      });
      const [{ n: jobs }] = await ds.query(`SELECT count(*)::int AS n FROM jobs WHERE type = 'DELETE_BACKUP' AND status = 'QUEUED'`);
      const [{ n: deleting }] = await ds.query(`SELECT count(*)::int AS n FROM backups WHERE status = 'DELETING'`);
      if (retain.result !== prev.result.drop || jobs !== retain.result || deleting !== retain.result) {
        throw new Error(`retain deleted ${retain.result}, preview said ${prev.result.drop}; ${jobs} DELETE_BACKUP jobs QUEUED, ${deleting} backups DELETING`);
      }
      log(`retention verified: ${fmtInt(retain.result)} DELETE_BACKUP jobs QUEUED = backups DELETING = the preview's deletions`);
    }

    let profileFile: string | null = null;
    if (profiler) {
      const { profile } = await profiler.post("Profiler.stop");
      profileFile = path.join(opts.dir, `stowage-bench-scheduler-${Date.now()}.cpuprofile`);
      await fsp.writeFile(profileFile, JSON.stringify(profile));
      profiler.disconnect();
      profiler = null;
    }
    const loadEnd = os.loadavg()[0];

    // ---- the report --------------------------------------------------------------------------
    const rate = (n: number, s: number, unit: string) => `${fmtInt(Math.round(n / s))} ${unit}/s`;
    const lines: string[] = [""];
    lines.push(
      `Scheduler benchmark: ${fmtInt(opts.resources)} disks bound to ${opts.policies} policies (${perPolicy} each), all due at one instant; retention over ${fmtInt(totalBackups)} backups ` +
        `(keepDaily ${RULES.keepDaily}, keepWeekly ${RULES.keepWeekly}, maxBackups ${RULES.maxBackups}); Postgres ${pg ? "embedded" : "at DATABASE_URL"}; ${os.cpus().length} CPUs, node ${process.version}. ` +
        `No peer program does this: the table shows Stowage's own times and rates.`,
    );
    lines.push("");
    const cells: string[][] = [];
    const row = (name: string, seconds: number, items: number, unit: string, statements: number | null) =>
      cells.push([name, seconds.toFixed(2), `${fmtInt(items)} ${unit}`, rate(items, seconds, unit), statements === null ? "—" : `${fmtInt(statements)} (${(statements / items).toFixed(1)})`]);
    row("one scheduler: occurrence → every BACKUP job queued", one.result.queuedS, opts.resources, "jobs", null);
    row("one scheduler: whole tick (runs + retention after each)", one.phase.seconds, opts.resources, "jobs", one.phase.statements);
    row(`two schedulers at once: every job queued (runs ${runsA} + ${runsB})`, two.result.queuedS, opts.resources, "jobs", null);
    row("two schedulers at once: both ticks done", two.phase.seconds, opts.resources, "jobs", two.phase.statements);
    row(`retention decision pass: preview() × ${opts.policies} policies`, prev.phase.seconds, totalBackups, "backups", prev.phase.statements);
    if (retain) {
      row(`retention: retain() × ${opts.policies} policies (all decided)`, retain.phase.seconds, totalBackups, "backups", null);
      row(`retention: retain() — DELETE_BACKUP jobs enqueued`, retain.phase.seconds, retain.result, "deletions", retain.phase.statements);
    }
    lines.push(...table(["measurement", "time (s)", "items", "rate", "SQL statements (per item)"], cells));
    lines.push("");
    lines.push(
      `- ${verdict(true)} every tick: ${fmtInt(opts.resources)} QUEUED BACKUP jobs and each of the ${opts.policies} policies ran exactly once (one scheduler, and two at once: ${runsA} + ${runsB} runs, none twice)`,
    );
    lines.push(
      `- ${verdict(one.result.queuedS < 5)} target: one scheduler queues all ${fmtInt(opts.resources)} jobs in under 5 s (${one.result.queuedS.toFixed(2)} s; past it, profile with \`--cpu-prof\`)`,
    );
    if (retain)
      lines.push(
        `- ${verdict(true)} retention deleted ${fmtInt(retain.result)} of ${fmtInt(totalBackups)} backups (${fmtInt(prev.result.keep)} kept), exactly what the preview decided; as many DELETE_BACKUP jobs QUEUED`,
        `- ${verdict(retain.phase.seconds < 15)} target: the retention pass decides over all ${fmtInt(totalBackups)} backups and queues its deletions in under 15 s (${retain.phase.seconds.toFixed(2)} s)`,
      );
    lines.push("");
    lines.push("Details:");
    lines.push(
      `- the occurrence is T = ${T.toISOString()}; the tick runs at T + 1 s, so "occurrence → queued" is the tick's start → the last BACKUP job announced (its transaction committed). In the service the scheduler ticks every ${config.schedulerIntervalSeconds} s (SCHEDULER_INTERVAL_SECONDS), which adds up to that much before the tick starts`,
    );
    lines.push(`- announcing is one pg_notify statement per policy run for all its jobs (PgEventBus, as in the service); no job runner runs, so no job starts`);
    lines.push(
      `- setup by bulk SQL and VACUUM ANALYZE, not timed, then an untimed warm-up tick of one policy (JIT, TypeORM metadata); between the ticks what they made is deleted and the tables vacuumed; ${opts.history ? `the tables hold the previous day's run (${fmtInt(opts.resources)} AVAILABLE backups, ${fmtInt(opts.resources)} SUCCEEDED jobs), so each new backup is incremental on one` : "--no-history: the jobs and backups tables start empty (a fresh install's first run)"}; the retention phase starts from empty tables plus its ${fmtInt(totalBackups)} backups`,
    );
    for (const p of phases) {
      lines.push(
        `- ${p.label}: ${p.seconds.toFixed(2)} s; CPU: this node process ${p.nodeCpu.toFixed(2)} s, Postgres ${p.pgCpu === null ? "n/a (external)" : `${p.pgCpu.toFixed(2)} s`}; ` +
          `${fmtInt(p.statements)} statements (${((p.seconds * 1e6) / Math.max(1, p.statements)).toFixed(0)} µs each on average); most sent: ${p.topStatements
            .slice(0, 5)
            .map(([s, n]) => `${fmtInt(n)}× \`${s}\``)
            .join(", ")}`,
      );
    }
    lines.push(`- load average (1 min) ${loadStart.toFixed(2)} at the start, ${loadEnd.toFixed(2)} at the end, on ${os.cpus().length} CPUs`);
    process.stdout.write(lines.join("\n") + "\n");
    if (profileFile) {
      const out = profileLines(
        `CPU profile of this process (${profileFile}), by phase:`,
        profileFile,
        phases.map((p) => p.window),
      );
      process.stdout.write(out.join("\n") + "\n");
    }
    return 0;
  } finally {
    if (profiler) profiler.disconnect();
    await cleanup();
  }
}

runBench(main);
