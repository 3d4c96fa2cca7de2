/**
 * Subscriptions benchmark: N open `jobUpdated` subscriptions over graphql-ws on one
 * service process while backup jobs run. There is no peer program: the table shows
 * the memory per idle subscription, the events delivered and the service's worst
 * event-loop stall, against the targets "every event delivered" and "no stall over 100 ms".
 *
 *   npm run bench:subscriptions                                   # 1,000 subscriptions on 100 connections, 20 jobs
 *   npm run bench:subscriptions -- --subscriptions 10000          # 10,000 (100 per connection)
 *   npm run bench:subscriptions -- --subscriptions 4 --connections 4   # baseline: the jobs' own event-loop stalls
 *   options: --connections N (default 100), --jobs N (backup jobs, default 20), --projects N (default 4),
 *   --disk-size SIZE (bytes each job backs up, random, default 64M), --keep (keep the temp dir),
 *   --dir DIR (where the temp dir goes; default $TMPDIR), --dist[=DIR] (run the compiled build)
 *
 * Stowage runs as `node bin/stowage.js serve` on a fresh data dir (embedded Postgres,
 * local blobs) with WS_MAX_CONNECTIONS_PER_ADDRESS set above --connections (every
 * connection comes from 127.0.0.1) and JOB_CONCURRENCY = --jobs (at most 64), so the
 * jobs run at once. Setup (untimed): --projects projects (`stowage project create`), per
 * job a disk filled with random bytes. Each connection authenticates as one project
 * (round robin) and carries N / connections subscriptions `jobUpdated { id status bytesDone }`.
 * Memory per idle subscription = (VmRSS of the service process once they are open and
 * the service is idle) minus (VmRSS before the first connection), over N. Then one
 * backup per disk is started and every subscriber's events are counted until each has
 * seen every job of its project end. Expected events per subscriber: every distinct
 * (job, status, bytesDone) any subscriber of its project received (the service coalesces
 * a job's events that arrive faster than a subscriber reads, so this is what was there to
 * be read); the terminal state of every job of its project is also counted on its own.
 * The event-loop stall is measured twice: a probe in a worker thread of this process
 * GETs /healthz every 20 ms during the run (the slowest answer bounds any stall from
 * above, network and the client's own scheduling included), and the service's own
 * `stowage_event_loop_delay_seconds{stat="max"}` from /metrics after the run (its window
 * is one to two minutes, so it includes the opening of the subscriptions).
 */
import crypto from "node:crypto";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Worker } from "node:worker_threads";
import { createClient, type Client } from "graphql-ws";
import WebSocket from "ws";
import { BARE_DIST, int, parseFlags, parseSize, runBench } from "./lib/cli";
import { MiB } from "./lib/image";
import { hrSeconds, onInterrupt, procStatusKiB, run } from "./lib/proc";
import { fmtInt, log, table, verdict } from "./lib/report";
import { StowageProcess } from "./lib/stowage";

interface Options {
  subscriptions: number;
  connections: number;
  jobs: number;
  projects: number;
  diskSize: number;
  keep: boolean;
  dir: string;
  dist: string | null;
}

function options(argv: string[]): Options {
  const v = parseFlags(
    __filename,
    argv,
    {
      subscriptions: { type: "string" },
      connections: { type: "string" },
      jobs: { type: "string" },
      projects: { type: "string" },
      "disk-size": { type: "string" },
      keep: { type: "boolean" },
      dir: { type: "string" },
      dist: { type: "string" },
    },
    BARE_DIST,
  );
  const o: Options = {
    subscriptions: int(v.subscriptions, "--subscriptions", 1000),
    connections: int(v.connections, "--connections", 100),
    jobs: int(v.jobs, "--jobs", 20),
    projects: int(v.projects, "--projects", 4),
    diskSize: v["disk-size"] === undefined ? 64 * MiB : parseSize(v["disk-size"], "--disk-size"),
    keep: v.keep ?? false,
    dir: v.dir ?? os.tmpdir(),
    dist: v.dist === undefined ? null : path.resolve(v.dist),
  };
  if (o.connections > o.subscriptions) throw new Error("--connections must not exceed --subscriptions");
  if (o.projects > o.connections || o.projects > o.jobs) throw new Error("--projects must not exceed --connections nor --jobs");
  return o;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A GraphQL request as the project of `key`. UNAVAILABLE (the service's database pool
 * did not answer in time) is retried every second for a minute, and counted.
 */
async function gqlAs<T = any>(url: string, key: string, query: string, variables: Record<string, unknown> = {}): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(`${url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
      body: JSON.stringify({ query, variables }),
    });
    const body = (await res.json()) as { data?: T; errors?: { message: string; extensions?: { code?: string } }[] };
    if (!body.errors?.length) return body.data!;
    if (body.errors.some((e) => e.extensions?.code === "UNAVAILABLE") && attempt < 60) {
      unavailable++;
      await sleep(1000);
      continue;
    }
    throw new Error(`GraphQL: ${body.errors.map((e) => e.message).join("; ")}`);
  }
}

let unavailable = 0;

/** Polls a job of the project `key` opens every 250 ms until it ends; throws unless it SUCCEEDED. */
async function waitJob(url: string, key: string, jobId: string): Promise<void> {
  for (;;) {
    const { node } = await gqlAs<{ node: { status: string; error: { code: string; message: string } | null } | null }>(
      url,
      key,
      `query ($id: ID!) { node(id: $id) { ... on Job { status error { code message } } } }`,
      { id: jobId },
    );
    if (!node) throw new Error(`job ${jobId} not found`);
    if (node.status === "SUCCEEDED") return;
    if (node.status === "FAILED" || node.status === "CANCELLED") throw new Error(`job ${jobId} ended ${node.status}: ${node.error?.code} ${node.error?.message}`);
    await sleep(250);
  }
}

/** A project's API key: `stowage project create`, which works beside the running service. */
async function createProject(svc: StowageProcess, name: string, dist: string | null): Promise<string> {
  const root = path.join(__dirname, "..");
  const args = dist
    ? ["-e", `require(${JSON.stringify(path.join(dist, "src", "main.js"))}).run(["project", "create", ${JSON.stringify(name)}])`]
    : [path.join(root, "bin", "stowage.js"), "project", "create", name];
  const env: NodeJS.ProcessEnv = { ...process.env, STOWAGE_DATA_DIR: svc.dataDir, LOG_LEVEL: "warn" };
  for (const k of Object.keys(env)) if (k === "DATABASE_URL" || k.startsWith("S3_")) delete env[k];
  const r = await run(process.execPath, args, { env, cwd: root });
  if (r.code !== 0) throw new Error(`stowage project create ${name} failed:\n${r.stderr}`);
  return r.stdout.trim().split("\n").pop()!.trim();
}

async function fillDisk(url: string, key: string, diskId: string, size: number): Promise<void> {
  const chunk = 16 * MiB;
  for (let at = 0; at < size; at += chunk) {
    const length = Math.min(chunk, size - at);
    const res = await fetch(`${url}/v1/disks/${encodeURIComponent(diskId)}/data`, {
      method: "PUT",
      headers: {
        authorization: `Bearer ${key}`,
        "content-type": "application/octet-stream",
        "content-range": `bytes ${at}-${at + length - 1}/*`,
      },
      body: crypto.randomBytes(length),
    });
    if (res.status !== 200) throw new Error(`PUT ${at}+${length}: ${res.status} ${await res.text()}`);
  }
}

/** What one subscription received. */
interface Sub {
  project: number;
  events: number;
  /** `${jobId} ${status} ${bytesDone}` of every event. */
  states: Set<string>;
  ended: Set<string>;
  errors: string[];
}

/** Polls `probe` until it returns the same value (within 1%) twice in a row, `ms` apart. */
async function settled(probe: () => number, ms = 1000, tries = 30): Promise<number> {
  let last = probe();
  for (let i = 0; i < tries; i++) {
    await sleep(ms);
    const now = probe();
    if (Math.abs(now - last) <= last * 0.01) return now;
    last = now;
  }
  return last;
}

/** A worker thread that GETs /healthz every 20 ms and reports each answer's latency with its start time. */
function startProbe(url: string): { samples: [number, number][]; stop: () => Promise<void> } {
  const samples: [number, number][] = [];
  const code = `
    const { parentPort, workerData } = require("node:worker_threads");
    let stop = false;
    parentPort.on("message", () => (stop = true));
    (async () => {
      while (!stop) {
        const at = Date.now();
        const t0 = performance.now();
        try { const r = await fetch(workerData.url + "/healthz"); await r.arrayBuffer(); } catch {}
        parentPort.postMessage([at, performance.now() - t0]);
        await new Promise((r) => setTimeout(r, 20));
      }
      parentPort.close();
    })();`;
  const worker = new Worker(code, { eval: true, workerData: { url } });
  worker.on("message", (m: [number, number]) => samples.push(m));
  return {
    samples,
    stop: async () => {
      worker.postMessage("stop");
      await new Promise<void>((r) => worker.once("exit", () => r()));
    },
  };
}

async function metricsLoopMax(url: string, token: string): Promise<number | null> {
  const res = await fetch(`${url}/metrics`, { headers: { authorization: `Bearer ${token}` } });
  const m = /^stowage_event_loop_delay_seconds\{stat="max"\}\s+(\S+)/m.exec(await res.text());
  return m ? Number(m[1]) : null;
}

const live: { svc: StowageProcess | null; clients: Client[] } = { svc: null, clients: [] };

async function main(): Promise<number> {
  const opts = options(process.argv.slice(2));
  const tmp = await fsp.mkdtemp(path.join(opts.dir, "stowage-bench-subs-"));
  await fsp.chmod(tmp, 0o755);
  const cleanup = async () => {
    for (const c of live.clients) await c.dispose();
    await live.svc?.stop().catch(() => undefined);
    live.svc = null;
  };
  onInterrupt(async () => {
    await cleanup();
    if (!opts.keep) await fsp.rm(tmp, { recursive: true, force: true });
  }, log);
  const metricsToken = crypto.randomBytes(16).toString("hex");
  const wsLimit = opts.connections + 16;
  try {
    const svc = await StowageProcess.start(path.join(tmp, "stowage"), {
      env: {
        WS_MAX_CONNECTIONS_PER_ADDRESS: String(wsLimit),
        JOB_CONCURRENCY: String(Math.min(64, opts.jobs)),
        GC_INTERVAL_SECONDS: "0",
        SCHEDULER_INTERVAL_SECONDS: "0",
        METRICS_TOKEN: metricsToken,
      },
      dist: opts.dist,
    });
    live.svc = svc;
    log(`Stowage serving at ${svc.url} (pid ${svc.pid}); WS_MAX_CONNECTIONS_PER_ADDRESS=${wsLimit}, JOB_CONCURRENCY=${Math.min(64, opts.jobs)}`);

    // ---- setup (untimed): projects, and per job a disk of random bytes ----------------
    const keys = [svc.key];
    for (let p = 1; p < opts.projects; p++) keys.push(await createProject(svc, `bench-${p}`, opts.dist));
    const disks: { project: number; id: string }[] = [];
    for (let j = 0; j < opts.jobs; j++) {
      const project = j % opts.projects;
      const r = await gqlAs(svc.url, keys[project], `mutation ($n: String!, $s: SafeInt!) { createDisk(input: { name: $n, sizeBytes: $s }) { disk { id } } }`, {
        n: `bench-${j}`,
        s: opts.diskSize,
      });
      disks.push({ project, id: r.createDisk.disk.id });
      await fillDisk(svc.url, keys[project], r.createDisk.disk.id, opts.diskSize);
    }
    log(`${opts.projects} projects, ${opts.jobs} disks of ${opts.diskSize / MiB} MiB filled`);

    // ---- open the subscriptions ----------------------------------------------------
    const rss = () => procStatusKiB(svc.pid, "VmRSS") ?? 0;
    const rssBefore = await settled(rss);
    const wsUrl = svc.url.replace(/^http/, "ws") + "/graphql";
    const subs: Sub[] = [];
    const t0 = hrSeconds();
    const perConnection = (c: number) => Math.floor(opts.subscriptions / opts.connections) + (c < opts.subscriptions % opts.connections ? 1 : 0);
    const openConnection = async (c: number) => {
      const project = c % opts.projects;
      const client = createClient({
        url: wsUrl,
        webSocketImpl: WebSocket,
        connectionParams: { authorization: `Bearer ${keys[project]}` },
        lazy: false,
        retryAttempts: 0,
        onNonLazyError: () => undefined,
      });
      live.clients.push(client);
      await new Promise<void>((resolve, reject) => {
        client.on("connected", () => resolve());
        client.on("closed", (e) => reject(new Error(`connection ${c} closed: ${(e as { code?: number; reason?: string }).code} ${(e as { reason?: string }).reason}`)));
        client.on("error", (e) => reject(e instanceof Error ? e : new Error(`connection ${c}: ${String(e)}`)));
      });
      for (let k = 0; k < perConnection(c); k++) {
        const sub: Sub = { project, events: 0, states: new Set(), ended: new Set(), errors: [] };
        subs.push(sub);
        client.subscribe<{ jobUpdated: { id: string; status: string; bytesDone: number } }>(
          { query: "subscription { jobUpdated { id status bytesDone } }" },
          {
            next: (r) => {
              if (r.errors?.length) return void sub.errors.push(r.errors.map((e) => e.message).join("; "));
              const j = r.data!.jobUpdated;
              sub.events++;
              sub.states.add(`${j.id} ${j.status} ${j.bytesDone}`);
              if (j.status === "SUCCEEDED" || j.status === "FAILED" || j.status === "CANCELLED") sub.ended.add(j.id);
            },
            error: (e) => sub.errors.push(e instanceof Error ? e.message : JSON.stringify(e)),
            complete: () => undefined,
          },
        );
      }
    };
    for (let c = 0; c < opts.connections; c += 20) await Promise.all(Array.from({ length: Math.min(20, opts.connections - c) }, (_, k) => openConnection(c + k)));
    const openSeconds = hrSeconds() - t0;
    const rssAfter = await settled(rss);
    log(`${fmtInt(subs.length)} subscriptions on ${opts.connections} connections sent in ${openSeconds.toFixed(1)} s; VmRSS ${(rssBefore / 1024).toFixed(0)} → ${(rssAfter / 1024).toFixed(0)} MiB`);
    const opened = subs.filter((s) => s.errors.length).length;
    if (opened) throw new Error(`${opened} subscriptions failed to open: ${subs.find((s) => s.errors.length)!.errors[0]}`);

    // ---- run the jobs ------------------------------------------------------------
    const probe = startProbe(svc.url);
    await sleep(200);
    const runStart = Date.now();
    const jobs: { project: number; id: string }[] = await Promise.all(
      disks.map(async (d) => {
        const r = await gqlAs(svc.url, keys[d.project], `mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { job { id } } }`, { r: d.id });
        return { project: d.project, id: r.createBackup.job.id as string };
      }),
    );
    const jobsOf = (p: number) => jobs.filter((j) => j.project === p).map((j) => j.id);
    for (const j of jobs) await waitJob(svc.url, keys[j.project], j.id);
    const jobsDone = Date.now();
    // Every subscriber has seen every job of its project end, or 30 s more have passed.
    const allSeen = () => subs.every((s) => jobsOf(s.project).every((id) => s.ended.has(id)));
    const waitUntil = Date.now() + 30_000;
    while (!allSeen() && Date.now() < waitUntil) await sleep(100);
    const runEnd = Date.now();
    await probe.stop();
    const loopMax = await metricsLoopMax(svc.url, metricsToken);
    log(`jobs ran in ${((jobsDone - runStart) / 1000).toFixed(1)} s; the last subscriber was done ${((runEnd - jobsDone) / 1000).toFixed(1)} s later`);

    // ---- count ---------------------------------------------------------------------
    let delivered = 0;
    let expected = 0;
    let endedGot = 0;
    let endedWanted = 0;
    let missing = 0;
    const union = new Map<number, Set<string>>();
    for (const s of subs) for (const st of s.states) (union.get(s.project) ?? union.set(s.project, new Set()).get(s.project)!).add(st);
    for (const s of subs) {
      const want = union.get(s.project)?.size ?? 0;
      expected += want;
      delivered += s.states.size;
      if (s.states.size < want) missing++;
      endedWanted += jobsOf(s.project).length;
      endedGot += jobsOf(s.project).filter((id) => s.ended.has(id)).length;
    }
    const received = subs.reduce((n, s) => n + s.events, 0);
    const inRun = probe.samples.filter(([at]) => at >= runStart && at <= runEnd);
    const probeMax = inRun.length ? Math.max(...inRun.map(([, ms]) => ms)) : null;
    const perSubKiB = (rssAfter - rssBefore) / subs.length;

    const lines = [
      "",
      `Subscriptions benchmark: ${fmtInt(subs.length)} jobUpdated subscriptions over graphql-ws, ${opts.jobs} backup jobs of ${opts.diskSize / MiB} MiB in ${opts.projects} projects; ${os.cpus().length} CPUs, node ${process.version}`,
      "",
      ...table(
        ["subscriptions", "connections", "RSS per idle subscription", "events delivered / expected", "job ends delivered / expected", "max event-loop delay: probe / service"],
        [
          [
            fmtInt(subs.length),
            fmtInt(opts.connections),
            `${perSubKiB.toFixed(1)} KiB`,
            `${fmtInt(delivered)} / ${fmtInt(expected)}`,
            `${fmtInt(endedGot)} / ${fmtInt(endedWanted)}`,
            `${probeMax === null ? "n/a" : probeMax.toFixed(0)} ms / ${loopMax === null ? "n/a" : (loopMax * 1000).toFixed(0)} ms`,
          ],
        ],
      ),
      "",
      `- ${verdict(delivered === expected && endedGot === endedWanted)} every event delivered (${fmtInt(missing)} subscriptions missed some; every job's end: ${endedGot === endedWanted ? "all delivered" : `${fmtInt(endedWanted - endedGot)} missing`})`,
      `- ${verdict(probeMax === null ? null : probeMax <= 100)} no event-loop stall over 100 ms during the run (probe: slowest /healthz of ${inRun.length} in the run, ${probeMax === null ? "n/a" : probeMax.toFixed(0)} ms)`,
      "",
      "Details:",
      `- VmRSS of the service ${(rssBefore / 1024).toFixed(1)} MiB before the first connection, ${(rssAfter / 1024).toFixed(1)} MiB with the subscriptions open and idle: ${((rssAfter - rssBefore) / 1024).toFixed(1)} MiB for ${fmtInt(subs.length)}`,
      `- opening: ${openSeconds.toFixed(1)} s for ${opts.connections} connections (20 at a time) and their subscribe messages`,
      `- run: ${((jobsDone - runStart) / 1000).toFixed(1)} s from the first createBackup until every job was seen SUCCEEDED by polling; every subscriber saw every end ${((runEnd - jobsDone) / 1000).toFixed(1)} s later`,
      `- events received in all: ${fmtInt(received)} (${(received / subs.length).toFixed(1)} per subscription); distinct states per project (expected per subscriber): ${[...union].map(([p, s]) => `project ${p}: ${s.size}`).join(", ")}`,
      `- service's own stowage_event_loop_delay_seconds{stat="max"} after the run: ${loopMax === null ? "n/a" : `${(loopMax * 1000).toFixed(0)} ms`} (window of one to two minutes: includes opening the subscriptions)`,
      `- WS_MAX_CONNECTIONS_PER_ADDRESS=${wsLimit} (every connection comes from 127.0.0.1; the default is 32), JOB_CONCURRENCY=${Math.min(64, opts.jobs)}`,
      `- the bench's own requests (createBackup, job polls every 250 ms) answered UNAVAILABLE ${unavailable} times during the run (each retried after 1 s)`,
      `- load average (1 min) at the end ${os.loadavg()[0].toFixed(2)} on ${os.cpus().length} CPUs`,
    ];
    process.stdout.write(lines.join("\n") + "\n");
    return 0;
  } finally {
    await cleanup();
    if (opts.keep) log(`kept ${tmp}`);
    else await fsp.rm(tmp, { recursive: true, force: true });
  }
}

runBench(main);
