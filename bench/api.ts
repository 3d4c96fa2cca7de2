/**
 * API benchmark: the graph a console reads, against `{ __typename }` on the same
 * service and against PostGraphile 4 answering the same queries over the same rows.
 *
 *   npm run bench:api                                     # 50 servers × 2 disks, 1 and 50 connections, 10 s a cell
 *   npm run bench:api -- --servers 5 --duration 3         # smaller and shorter
 *   npm run bench:api -- --cpu-prof                       # also profile the service and print where its CPU goes
 *   options: --connections 1,50 (the loads), --shapes nested,jobs,backups (which shapes), --duration S (seconds a cell, after 1 s of warm-up),
 *   --backups-per-disk N (3 disk backups plus 3 server backups' parts, default 3), --jobs N (default 500),
 *   --ts-node (run the service under ts-node instead of the compiled build), --node-args=FLAGS (node flags for the
 *   service beside npm start's, e.g. --node-args=--max-semi-space-size=32), --keep, --dir DIR
 *
 * The service runs from the compiled build (dist/, built first when missing or stale)
 * on a fresh data directory with its embedded Postgres, which the benchmark first
 * starts once with pg_stat_statements preloaded. The rows are written in bulk SQL
 * (untimed) into the service's database: servers with a system and a data disk,
 * policies bound to the servers, per server backups each with one part per disk,
 * per disk backups of their own, a FULL_SERVER image of each server backup, and
 * SUCCEEDED jobs pointing at the servers, disks, backups, policies and images.
 * PostGraphile (`postgraphile` 4, in its own node process, its pool as large as the
 * service's) serves the same database through a role that may only SELECT.
 *
 * Each shape runs at each load with autocannon for --duration seconds:
 *   nested   servers(first: 50) { systemDisk, disks(first: 10) { backups(first: 5) { totalCount } }, policies(first: 5) }
 *   jobs     jobs(first: 50) with each job's server, disk, backup, policy and image
 *   backups  top-level backups(first: 50) with children(first: 10) and images(first: 5)
 * Every answer is checked once before the load (no errors, the same number of
 * objects from both servers); a non-2xx answer or a socket error under load fails the run.
 * SQL statements and Postgres time per request come from pg_stat_statements: reset
 * before a cell, read once the servers have answered every request sent in it (requests
 * in flight when autocannon stops are still answered), divided by the requests sent.
 * CPU per request is the CPU time of the answering server's process and of the Postgres cluster's processes over the
 * cell, divided by the requests answered (what one core can answer per second is 1000 over their sum).
 * BEGIN/COMMIT count as statements; the statements the idle service sends by itself (job queue, scheduler: recorded
 * over 10 s before the first cell, printed) are left out. Peak RSS is the largest VmRSS
 * of the server's node process seen during the cell (sampled every 50 ms).
 * Targets: nested at 50 connections ≥ 1.0× PostGraphile's requests/s; ≤ 5 SQL
 * statements a request for every shape; stretch: nested at 50 ≥ 0.3× `{ __typename }`.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import { openEmbeddedPostgres } from "../src/db/embedded-postgres";
import { silentLogger } from "../src/logger";
import { int, parseFlags, runBench } from "./lib/cli";
import { profileLines, type Window } from "./lib/cpuprofile";
import { cpuTree, freePort, onInterrupt, RssSampler } from "./lib/proc";
import { f2, fmtInt, log, table, verdict, x } from "./lib/report";
import { StowageProcess } from "./lib/stowage";

// autocannon ships no types.
const autocannon = require("autocannon") as (opts: Record<string, unknown>) => Promise<CannonResult>;

interface CannonResult {
  requests: { average: number; total: number; sent: number };
  latency: { p50: number; p99: number };
  duration: number;
  errors: number;
  timeouts: number;
  non2xx: number;
}

interface Options {
  servers: number;
  backupsPerDisk: number;
  jobs: number;
  connections: number[];
  shapes: Shape[];
  duration: number;
  tsNode: boolean;
  cpuProf: boolean;
  nodeArgs: string[];
  keep: boolean;
  dir: string;
}

function options(argv: string[]): Options {
  const v = parseFlags(__filename, argv, {
    servers: { type: "string" },
    "backups-per-disk": { type: "string" },
    jobs: { type: "string" },
    connections: { type: "string" },
    shapes: { type: "string" },
    duration: { type: "string" },
    "ts-node": { type: "boolean" },
    "cpu-prof": { type: "boolean" },
    "node-args": { type: "string" },
    keep: { type: "boolean" },
    dir: { type: "string" },
  });
  return {
    servers: int(v.servers, "--servers", 50),
    backupsPerDisk: int(v["backups-per-disk"], "--backups-per-disk", 3),
    jobs: int(v.jobs, "--jobs", 500),
    connections: (v.connections ?? "1,50").split(",").map((c) => int(c.trim(), "--connections", 1)),
    shapes: (v.shapes ?? SHAPES.map((s) => s.name).join(",")).split(",").map((name) => {
      const shape = SHAPES.find((s) => s.name === name.trim());
      if (!shape) throw new Error(`--shapes: no shape ${name} (there are ${SHAPES.map((s) => s.name).join(", ")})`);
      return shape;
    }),
    duration: int(v.duration, "--duration", 10),
    tsNode: v["ts-node"] ?? false,
    cpuProf: v["cpu-prof"] ?? false,
    nodeArgs: v["node-args"]?.split(/\s+/).filter(Boolean) ?? [],
    keep: v.keep ?? false,
    dir: v.dir ?? os.tmpdir(),
  };
}

interface Shape {
  name: string;
  stowage: string;
  graphile: string;
}

const SHAPES: Shape[] = [
  {
    name: "nested",
    stowage: `{ servers(first: 50) { nodes { id name status
      systemDisk { id name status sizeBytes }
      disks(first: 10) { nodes { id name status device backups(first: 5) { totalCount nodes { id name status createdAt } } } }
      policies(first: 5) { nodes { id name enabled } } } } }`,
    graphile: `{ allServers(first: 50, orderBy: [CREATED_AT_ASC, ID_ASC]) { nodes { id name status
      systemDisk: disksByProjectIdAndServerId(first: 1, condition: { type: "SYSTEM" }) { nodes { id name status sizeBytes } }
      disks: disksByProjectIdAndServerId(first: 10, orderBy: [CREATED_AT_ASC, ID_ASC]) { nodes { id name status device
        backups: backupsByProjectIdAndDiskId(first: 5, orderBy: [CREATED_AT_ASC, ID_ASC]) { totalCount nodes { id name status createdAt } } } }
      policies: policyBindingsByProjectIdAndServerId(first: 5, orderBy: [CREATED_AT_ASC, ID_ASC]) { nodes { policy: policyByProjectIdAndPolicyId { id name enabled } } } } } }`,
  },
  {
    name: "jobs",
    stowage: `{ jobs(first: 50) { totalCount nodes { id type status progress createdAt finishedAt
      server { id name } disk { id name } backup { id name status } policy { id name } image { id name status } } } }`,
    graphile: `{ allJobs(first: 50, orderBy: [CREATED_AT_ASC, ID_ASC]) { totalCount nodes { id type status progress createdAt finishedAt
      server: serverByProjectIdAndServerId { id name } disk: diskByProjectIdAndDiskId { id name }
      backup: backupByProjectIdAndBackupId { id name status } policy: policyByProjectIdAndPolicyId { id name }
      image: imageByProjectIdAndImageId { id name status } } } }`,
  },
  {
    name: "backups",
    stowage: `{ backups(first: 50, filter: { topLevel: true }) { totalCount nodes { id name status resourceType createdAt
      children(first: 10) { totalCount nodes { id name status sizeBytes } }
      images(first: 5) { nodes { id name status } } } } }`,
    graphile: `{ allBackups(first: 50, condition: { parentId: null }, orderBy: [CREATED_AT_ASC, ID_ASC]) { totalCount nodes { id name status resourceType createdAt
      children: backupsByProjectIdAndParentId(first: 10, orderBy: [CREATED_AT_ASC, ID_ASC]) { totalCount nodes { id name status sizeBytes } }
      images: imagesByProjectIdAndSourceBackupId(first: 5, orderBy: [CREATED_AT_ASC, ID_ASC]) { nodes { id name status } } } } }`,
  },
];

const TYPENAME = "{ __typename }";

/** The objects with an id in an answer: what both servers must agree on. */
function countIds(v: unknown): number {
  if (Array.isArray(v)) return v.reduce((n: number, e) => n + countIds(e), 0);
  if (v && typeof v === "object") return ("id" in v ? 1 : 0) + Object.values(v).reduce((n: number, e) => n + countIds(e), 0);
  return 0;
}

async function post(url: string, query: string, headers: Record<string, string>): Promise<unknown> {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json", ...headers }, body: JSON.stringify({ query }) });
  const body = (await res.json()) as { data?: unknown; errors?: { message: string }[] };
  if (res.status !== 200 || body.errors?.length) throw new Error(`${url}: ${res.status} ${JSON.stringify(body.errors ?? body).slice(0, 2000)}`);
  return body.data;
}

/** Rows for the three shapes, written in bulk into the service's database (untimed). */
async function seed(db: Client, o: Options): Promise<Record<string, number>> {
  const [{ id: projectId }] = (await db.query(`SELECT id FROM projects ORDER BY created_at LIMIT 1`)).rows;
  const q = (sql: string, params: unknown[] = []) => db.query(sql, [projectId, ...params]);
  await q(
    `INSERT INTO servers (project_id, name, status, vcpus, memory_mib, os_type, created_at)
     SELECT $1, 'server-' || lpad(i::text, 4, '0'), 'ACTIVE', 2, 4096, 'LINUX', now() - interval '30 days' + i * interval '1 second' FROM generate_series(1, $2) i`,
    [o.servers],
  );
  await q(
    `INSERT INTO disks (project_id, name, type, size_bytes, used_bytes, status, server_id, device, created_at)
     SELECT $1, s.name || '-' || d.kind, d.kind, 10737418240, 1073741824, 'IN_USE', s.id, d.device, s.created_at + d.n * interval '1 millisecond'
       FROM servers s CROSS JOIN (VALUES (0, 'SYSTEM', '/dev/vda'), (1, 'DATA', '/dev/vdb')) d(n, kind, device) WHERE s.project_id = $1`,
  );
  const policies = Math.max(1, Math.ceil(o.servers / 5));
  await q(
    `INSERT INTO policies (project_id, name, schedule, timezone, keep_daily, created_at)
     SELECT $1, 'policy-' || lpad(i::text, 3, '0'), ARRAY['FREQ=DAILY;BYHOUR=2;BYMINUTE=0;BYSECOND=0'], 'UTC', 7, now() - interval '60 days' + i * interval '1 second'
       FROM generate_series(1, $2) i`,
    [policies],
  );
  await q(
    `INSERT INTO policy_bindings (project_id, policy_id, server_id)
     SELECT $1, p.id, s.id
       FROM (SELECT id, row_number() OVER (ORDER BY name) - 1 AS n FROM servers WHERE project_id = $1) s
       JOIN (SELECT id, row_number() OVER (ORDER BY name) - 1 AS n FROM policies WHERE project_id = $1) p ON p.n = s.n % $2`,
    [policies],
  );
  // Per server, backupsPerDisk server backups (by policy), each with a part per disk; per disk as many backups of its own.
  await q(
    `INSERT INTO backups (project_id, name, resource_type, resource_id, resource_name, server_id, status, trigger, policy_id, progress, size_bytes, stored_bytes, created_at, completed_at)
     SELECT $1, s.name || '-bk-' || k, 'SERVER', s.id, s.name, s.id, 'AVAILABLE', 'POLICY', b.policy_id, 1, 2147483648, 536870912,
            now() - interval '20 days' + k * interval '1 day' + s.n * interval '1 second', now() - interval '20 days' + k * interval '1 day' + s.n * interval '1 second' + interval '1 minute'
       FROM (SELECT id, name, row_number() OVER (ORDER BY name) AS n FROM servers WHERE project_id = $1) s
       JOIN policy_bindings b ON b.server_id = s.id CROSS JOIN generate_series(1, $2) k`,
    [o.backupsPerDisk],
  );
  await q(
    `INSERT INTO backups (project_id, name, resource_type, resource_id, resource_name, server_id, disk_id, parent_id, status, trigger, policy_id, progress,
                          size_bytes, stored_bytes, disk_size_bytes, disk_type, device, created_at, completed_at)
     SELECT $1, p.name || '-' || d.type, 'DISK', d.id, d.name, d.server_id, d.id, p.id, 'AVAILABLE', 'POLICY', p.policy_id, 1,
            1073741824, 268435456, d.size_bytes, d.type, d.device, p.created_at, p.completed_at
       FROM backups p JOIN disks d ON d.server_id = p.server_id WHERE p.project_id = $1 AND p.resource_type = 'SERVER'`,
  );
  await q(
    `INSERT INTO backups (project_id, name, resource_type, resource_id, resource_name, server_id, disk_id, status, trigger, progress,
                          size_bytes, stored_bytes, disk_size_bytes, disk_type, device, created_at, completed_at)
     SELECT $1, d.name || '-manual-' || k, 'DISK', d.id, d.name, d.server_id, d.id, 'AVAILABLE', 'MANUAL', 1, 1073741824, 134217728, d.size_bytes, d.type, d.device,
            now() - interval '10 days' + k * interval '1 day' + (extract(epoch FROM d.created_at) % 86400) * interval '1 millisecond',
            now() - interval '10 days' + k * interval '1 day' + (extract(epoch FROM d.created_at) % 86400) * interval '1 millisecond' + interval '1 minute'
       FROM disks d CROSS JOIN generate_series(1, $2) k WHERE d.project_id = $1`,
    [o.backupsPerDisk],
  );
  await q(
    `INSERT INTO images (project_id, name, type, status, source, source_server_id, source_backup_id, os_type, min_disk_bytes, virtual_size_bytes, size_bytes, created_at)
     SELECT $1, b.name || '-image', 'FULL_SERVER', 'ACTIVE', 'BACKUP', b.server_id, b.id, 'LINUX', 10737418240, 10737418240, 2147483648, b.completed_at + interval '1 hour'
       FROM backups b WHERE b.project_id = $1 AND b.resource_type = 'SERVER'`,
  );
  // Jobs: each backup's (server backups and manual disk backups) and each image's, then as many more as --jobs asks, all SUCCEEDED.
  await q(
    `WITH made AS (
       SELECT 'BACKUP' AS type, b.server_id, b.disk_id, b.id AS backup_id, NULL::uuid AS image_id, b.policy_id, b.created_at
         FROM backups b WHERE b.project_id = $1 AND b.parent_id IS NULL
       UNION ALL
       SELECT 'CREATE_IMAGE', i.source_server_id, NULL, i.source_backup_id, i.id, NULL, i.created_at FROM images i WHERE i.project_id = $1),
     numbered AS (SELECT made.*, row_number() OVER (ORDER BY created_at) AS n, count(*) OVER () AS total FROM made)
     INSERT INTO jobs (project_id, type, status, progress, bytes_done, bytes_total, server_id, disk_id, backup_id, image_id, policy_id, created_at, started_at, finished_at)
     SELECT $1, m.type, 'SUCCEEDED', 1, 1073741824, 1073741824, m.server_id, m.disk_id, m.backup_id, m.image_id, m.policy_id,
            m.created_at + r * interval '1 millisecond', m.created_at + r * interval '1 millisecond', m.created_at + r * interval '1 millisecond' + interval '1 minute'
       FROM numbered m CROSS JOIN generate_series(0, greatest(0, ceil($2::float / m.total)::int - 1)) r`,
    [o.jobs],
  );
  await db.query(`UPDATE backups b SET job_id = j.id FROM jobs j WHERE j.backup_id = b.id AND j.type = 'BACKUP' AND j.image_id IS NULL`);
  await db.query(`VACUUM ANALYZE`);
  const counts: Record<string, number> = {};
  for (const t of ["servers", "disks", "policies", "policy_bindings", "backups", "images", "jobs"]) counts[t] = (await db.query(`SELECT count(*)::int AS n FROM ${t}`)).rows[0].n;
  return counts;
}

/** PostGraphile 4 in its own node process: read-only, no mutations, a pool as large as the service's. */
async function startPostGraphile(url: string, logFile: string): Promise<{ child: ChildProcess; url: string }> {
  const port = await freePort();
  // npm nests graphql 15 for PostGraphile's packages in more than one place (the project's is 16): every
  // require of graphql in this process goes to postgraphile's own copy, so its schema has one instance.
  const script = `
    const Module = require("node:module");
    const path = require("node:path");
    const own = path.dirname(require.resolve("postgraphile/package.json"));
    const resolve = Module._resolveFilename;
    Module._resolveFilename = function (request, parent, ...rest) {
      if (request === "graphql" || request.startsWith("graphql/")) return resolve.call(this, request, { id: own, filename: path.join(own, "index.js"), paths: Module._nodeModulePaths(own) }, ...rest);
      return resolve.call(this, request, parent, ...rest);
    };
    const http = require("node:http");
    const { Pool } = require("pg");
    const { postgraphile } = require("postgraphile");
    const pool = new Pool({ connectionString: process.env.PG_URL, max: 20 });
    const handler = postgraphile(pool, "public", { disableDefaultMutations: true, ignoreRBAC: false, setofFunctionsContainNulls: false, graphiql: false, retryOnInitFail: false });
    http.createServer(handler).listen(${port}, "127.0.0.1", () => console.log("listening"));
  `;
  // The environment the service gets (NODE_ENV as the caller's): graphql and Apollo/PostGraphile read it.
  const out = fs.openSync(logFile, "a");
  const child = spawn(process.execPath, ["-e", script], { env: { ...process.env, PG_URL: url }, stdio: ["ignore", "pipe", out] });
  fs.closeSync(out);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`PostGraphile did not start within 60 s; see ${logFile}`)), 60_000);
    child.stdout!.on("data", (d: Buffer) => {
      if (d.toString().includes("listening")) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on("exit", (code) => reject(new Error(`PostGraphile exited with ${code}: ${fs.readFileSync(logFile, "utf8").slice(-3000)}`)));
  });
  const gqlUrl = `http://127.0.0.1:${port}/graphql`;
  // The first request builds the schema (introspection); it is not measured.
  await post(gqlUrl, TYPENAME, {});
  return { child, url: gqlUrl };
}

interface Cell {
  server: "Stowage" | "PostGraphile";
  shape: string;
  connections: number;
  rps: number;
  p50: number;
  p99: number;
  requests: number;
  statements: number | null;
  pgMs: number | null;
  rssMiB: number;
  nodeCpu: number;
  /** CPU seconds of the answering server's own process (Stowage's, or PostGraphile's). */
  serverCpu: number;
  pgCpu: number;
  window: Window;
  /** The statements sent most often in the cell: calls per request and their text. */
  top: [number, string][];
}

/** pg_stat_statements of the service's database, less the benchmark's own reads of it. */
const STATEMENTS = `SELECT * FROM pg_stat_statements
  WHERE query NOT ILIKE '%pg_stat_statements%' AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())`;

async function main(): Promise<number> {
  const o = options(process.argv.slice(2));
  const tmp = await fsp.mkdtemp(path.join(o.dir, "stowage-bench-api-"));
  await fsp.chmod(tmp, 0o755);
  const dataDir = path.join(tmp, "data");
  let svc: StowageProcess | null = null;
  let graphile: ChildProcess | null = null;
  const clients: Client[] = [];
  const cleanup = async () => {
    for (const c of clients.splice(0)) await c.end().catch(() => undefined);
    graphile?.kill("SIGTERM");
    await svc?.stop().catch(() => undefined);
    svc = null;
    if (o.keep) log(`kept ${tmp}`);
    else await fsp.rm(tmp, { recursive: true, force: true });
  };
  onInterrupt(cleanup, log);
  try {
    const load = os.loadavg()[0];
    if (load > os.cpus().length / 2) log(`warning: load average ${load.toFixed(2)} on ${os.cpus().length} CPUs: other work will skew the numbers`);

    // The cluster, first without the service: pg_stat_statements must be preloaded when it starts.
    const first = await openEmbeddedPostgres(dataDir, silentLogger);
    {
      const c = new Client({ connectionString: first.url });
      await c.connect();
      await c.query(`ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'`);
      await c.query(`ALTER SYSTEM SET pg_stat_statements.track_utility = on`);
      await c.end();
    }
    await first.stop();

    let dist: string | null = null;
    if (!o.tsNode) {
      require("../bin/build").ensureBuilt(() => log("compiling the sources into dist/ (missing or older than the sources)"));
      dist = path.join(__dirname, "..", "dist");
    }
    const nodeArgs = [...o.nodeArgs, ...(o.cpuProf ? ["--cpu-prof", `--cpu-prof-dir=${path.join(tmp, "prof")}`, "--cpu-prof-interval=500"] : [])];
    svc = await StowageProcess.start(dataDir, { dist, nodeArgs, env: { GC_INTERVAL_SECONDS: "0" } });
    log(`Stowage ${dist ? "(compiled build)" : "(ts-node)"} at ${svc.url}`);
    // The service's own database in its cluster (the one src/app.ts creates).
    const dbUrl = new URL((await openEmbeddedPostgres(dataDir, silentLogger)).url);
    dbUrl.pathname = "/stowage";
    const db = new Client({ connectionString: dbUrl.toString() });
    await db.connect();
    db.on("error", (err) => log(`the benchmark's connection to Postgres failed: ${err.message}`));
    clients.push(db);
    await db.query(`CREATE EXTENSION IF NOT EXISTS pg_stat_statements`);
    const counts = await seed(db, o);
    log(
      `seeded (untimed): ${Object.entries(counts)
        .map(([k, v]) => `${fmtInt(v)} ${k}`)
        .join(", ")}`,
    );

    // PostGraphile's role may read every table and nothing more.
    await db.query(`DROP ROLE IF EXISTS bench_graphile`);
    await db.query(`CREATE ROLE bench_graphile LOGIN PASSWORD 'bench' NOSUPERUSER`);
    await db.query(`GRANT USAGE ON SCHEMA public TO bench_graphile`);
    await db.query(`GRANT SELECT ON ALL TABLES IN SCHEMA public TO bench_graphile`);
    await db.query(`ALTER ROLE bench_graphile SET default_transaction_read_only = on`);
    const gUrl = new URL(dbUrl);
    gUrl.username = "bench_graphile";
    gUrl.password = "bench";
    const pgLog = path.join(tmp, "postgraphile.log");
    const started = await startPostGraphile(gUrl.toString(), pgLog);
    graphile = started.child;
    log(`PostGraphile at ${started.url}`);

    const stowageUrl = `${svc.url}/graphql`;
    const auth = { authorization: `Bearer ${svc.key}` };
    for (const shape of o.shapes) {
      const a = countIds(await post(stowageUrl, shape.stowage, auth));
      const b = countIds(await post(started.url, shape.graphile, {}));
      log(`${shape.name}: Stowage answers ${fmtInt(a)} objects, PostGraphile ${fmtInt(b)}`);
      if (a !== b) throw new Error(`${shape.name}: the two answers differ in size (${a} vs ${b} objects): the queries are not equivalent`);
    }

    // What the idle service sends by itself (job queue, scheduler): those statements are left out of every cell.
    await db.query(`SELECT pg_stat_statements_reset()`);
    await new Promise((r) => setTimeout(r, 10_000));
    const background = (await db.query(`SELECT queryid::text AS id, calls::float8 AS calls FROM (${STATEMENTS}) s`)).rows as { id: string; calls: number }[];
    const idle = background.reduce((n, b) => n + b.calls, 0) / 10;
    const REQUESTS = `SELECT * FROM (${STATEMENTS}) s WHERE queryid::text <> ALL('{${background.map((b) => b.id).join(",")}}'::text[])`;
    log(`idle service: ${f2(idle)} SQL statements/s`);

    /** Waits until the servers have answered what was sent: no more than the idle rate of statements over a second. */
    const calls = async () => (await db.query(`SELECT coalesce(sum(calls), 0)::float8 AS calls FROM (${STATEMENTS}) s`)).rows[0].calls as number;
    const drain = async () => {
      for (let i = 0, last = await calls(); i < 120; i++) {
        await new Promise((r) => setTimeout(r, 1000));
        const now = await calls();
        if (now - last <= Math.ceil(idle) + 1) return;
        last = now;
      }
      log("warning: the servers were still sending SQL two minutes after the load stopped");
    };
    const cells: Cell[] = [];
    const measure = async (server: Cell["server"], shape: string, query: string, url: string, headers: Record<string, string>, pid: number, connections: number) => {
      const body = JSON.stringify({ query });
      const common = { url, method: "POST", headers: { "content-type": "application/json", ...headers }, body, connections };
      await autocannon({ ...common, duration: 1 }); // warm-up
      await drain();
      await db.query(`SELECT pg_stat_statements_reset()`);
      const rss = new RssSampler(pid, 50);
      const cpu0 = cpuTree(svc!.pid);
      const server0 = cpuTree(pid).self;
      const startUs = Number(process.hrtime.bigint() / 1000n);
      const r = await autocannon({ ...common, duration: o.duration });
      const endUs = Number(process.hrtime.bigint() / 1000n);
      const cpu1 = cpuTree(svc!.pid);
      const server1 = cpuTree(pid).self;
      rss.stop();
      if (r.errors || r.non2xx || r.timeouts) throw new Error(`${server} ${shape} at ${connections}: ${r.errors} errors, ${r.timeouts} timeouts, ${r.non2xx} non-2xx answers`);
      // Requests still in flight when autocannon stops are answered after it: their statements count, and so do they.
      await drain();
      const [st] = (await db.query(`SELECT sum(calls)::float8 AS calls, sum(total_exec_time)::float8 AS ms FROM (${REQUESTS}) s`)).rows;
      const busiest = (await db.query(`SELECT calls::float8 AS calls, query FROM (${REQUESTS}) s ORDER BY calls DESC LIMIT 6`)).rows as { calls: number; query: string }[];
      const requests = r.requests.total;
      const sent = Math.max(r.requests.sent, requests);
      const cell: Cell = {
        server,
        shape,
        connections,
        rps: requests / r.duration,
        p50: r.latency.p50,
        p99: r.latency.p99,
        requests,
        statements: sent ? (st.calls ?? 0) / sent : null,
        pgMs: sent ? (st.ms ?? 0) / sent : null,
        rssMiB: Math.max(...rss.peaks.values()) / 1024,
        nodeCpu: cpu1.self - cpu0.self,
        serverCpu: server1 - server0,
        pgCpu: cpu1.descendants - cpu0.descendants,
        window: { label: `${server} ${shape} @${connections}`, startUs, endUs },
        top: busiest.map((t) => [t.calls / Math.max(1, sent), t.query.replace(/\s+/g, " ").slice(0, 150)]),
      };
      cells.push(cell);
      log(`${server} ${shape} @${connections}: ${f2(cell.rps)} req/s, p50 ${cell.p50} ms, p99 ${cell.p99} ms, ${f2(cell.statements)} statements/req`);
    };
    for (const c of o.connections) {
      await measure("Stowage", "__typename", TYPENAME, stowageUrl, auth, svc.pid, c);
      for (const shape of o.shapes) {
        await measure("Stowage", shape.name, shape.stowage, stowageUrl, auth, svc.pid, c);
        await measure("PostGraphile", shape.name, shape.graphile, started.url, {}, graphile.pid!, c);
      }
    }

    // ---- the report ---------------------------------------------------------------------
    const out: string[] = [];
    out.push(
      `## API: ${fmtInt(counts.servers)} servers × 2 disks, ${fmtInt(counts.backups)} backups, ${fmtInt(counts.images)} images, ${fmtInt(counts.jobs)} jobs; ${o.duration} s a cell; Stowage ${dist ? "compiled" : "ts-node"}; load average ${os.loadavg()[0].toFixed(2)}`,
      "",
    );
    out.push(
      ...table(
        ["server", "shape", "conns", "req/s", "p50 (ms)", "p99 (ms)", "SQL stmts/req", "Postgres ms/req", "CPU ms/req: server / Postgres", "peak RSS (MiB)"],
        cells.map((c) => [
          c.server,
          c.shape,
          String(c.connections),
          fmtInt(Math.round(c.rps)),
          String(c.p50),
          String(c.p99),
          f2(c.statements),
          f2(c.pgMs),
          c.requests ? `${f2((c.serverCpu * 1000) / c.requests)} / ${f2((c.pgCpu * 1000) / c.requests)}` : "n/a",
          c.rssMiB.toFixed(0),
        ]),
      ),
    );
    const find = (server: Cell["server"], shape: string, conns: number) => cells.find((c) => c.server === server && c.shape === shape && c.connections === conns) ?? null;
    const top = Math.max(...o.connections);
    const nested = find("Stowage", "nested", top);
    const peer = find("PostGraphile", "nested", top);
    const ceiling = find("Stowage", "__typename", top);
    const ratio = (a: Cell | null, b: Cell | null) => (a && b ? a.rps / b.rps : null);
    const maxStatements = Math.max(...cells.filter((c) => c.server === "Stowage" && c.shape !== "__typename").map((c) => c.statements ?? Infinity));
    out.push("", "Targets:", "");
    out.push(
      ...table(
        ["target", "measured", "target", ""],
        [
          [`nested @${top} req/s / PostGraphile's`, x(ratio(nested, peer)), "≥ 1.0×", verdict(ratio(nested, peer) === null ? null : ratio(nested, peer)! >= 1)],
          ["SQL statements per request, any shape (Stowage)", f2(maxStatements), "≤ 5", verdict(maxStatements <= 5)],
          [`stretch: nested @${top} req/s / \`{ __typename }\``, x(ratio(nested, ceiling)), "≥ 0.3×", verdict(ratio(nested, ceiling) === null ? null : ratio(nested, ceiling)! >= 0.3)],
        ],
      ),
    );
    const stowageCells = cells.filter((c) => c.server === "Stowage");
    out.push(
      "",
      `The idle service sends ${f2(idle)} SQL statements/s by itself (those statements are left out of every cell's count). The statements sent most per request, by cell (calls per request):`,
    );
    for (const c of cells.filter((c) => c.connections === top)) {
      out.push("", `${c.server} ${c.shape} @${c.connections}:`, ...c.top.map(([n, q]) => `  ${n.toFixed(2).padStart(6)}  ${q}`));
    }
    out.push("", `Stowage CPU per cell (s, node / its Postgres): ${stowageCells.map((c) => `${c.shape}@${c.connections} ${f2(c.nodeCpu)}/${f2(c.pgCpu)}`).join(", ")}`);
    if (o.cpuProf) {
      // The profile is written when the service exits; nothing may hold its Postgres then.
      for (const c of clients.splice(0)) await c.end();
      graphile.kill("SIGTERM");
      await svc.stop();
      svc = null;
      const dir = path.join(tmp, "prof");
      const files = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith(".cpuprofile")) : [];
      if (files.length)
        out.push(
          "",
          ...profileLines(
            "Where the service's CPU went, per cell",
            path.join(dir, files[0]),
            stowageCells.map((c) => c.window),
          ),
        );
    }
    process.stdout.write(out.join("\n") + "\n");
    return 0;
  } finally {
    await cleanup();
  }
}

runBench(main);
