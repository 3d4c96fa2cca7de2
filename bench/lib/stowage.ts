import { spawn, type ChildProcess } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import type { Readable } from "node:stream";
import type { Window } from "./cpuprofile";
import { cpuTree, freePort, hrSeconds } from "./proc";
import { log } from "./report";

const ROOT = path.join(__dirname, "..", "..");

/** `node bin/stowage.js serve` on a fresh data directory, with its own embedded Postgres. */
/** The environment and node flags of package.json's `start` script (`NAME=value … node <flags> bin/stowage.js …`). */
function startCommand(): { env: Record<string, string>; flags: string[] } {
  const start = (JSON.parse(fs.readFileSync(path.join(ROOT, "package.json"), "utf8")) as { scripts: { start: string } }).scripts.start.split(/\s+/);
  const node = start.indexOf("node");
  const env = Object.fromEntries(start.slice(0, node).map((a) => [a.slice(0, a.indexOf("=")), a.slice(a.indexOf("=") + 1)]));
  return { env, flags: start.slice(node + 1, start.indexOf("bin/stowage.js")) };
}

export class StowageProcess {
  private constructor(
    readonly child: ChildProcess,
    readonly url: string,
    readonly key: string,
    readonly dataDir: string,
    readonly logFile: string,
  ) {}

  get pid(): number {
    return this.child.pid!;
  }

  /** `dist`: a compiled build's root (its src/main.js runs) instead of bin/stowage.js under ts-node. */
  static async start(dataDir: string, opts: { nodeArgs?: string[]; env?: Record<string, string>; dist?: string | null } = {}): Promise<StowageProcess> {
    fs.mkdirSync(dataDir, { recursive: true, mode: 0o755 });
    fs.chmodSync(dataDir, 0o755);
    const port = await freePort();
    const env: NodeJS.ProcessEnv = { ...process.env, PORT: String(port), HOST: "127.0.0.1", STOWAGE_DATA_DIR: dataDir, LOG_LEVEL: "warn", NBD_PORT: "0", ...opts.env };
    // The benchmark measures the defaults: embedded Postgres and blobs on the local filesystem.
    for (const k of Object.keys(env)) if (k === "DATABASE_URL" || k.startsWith("S3_")) delete env[k];
    const logFile = path.join(path.dirname(dataDir), "stowage.log");
    const log = fs.openSync(logFile, "a");
    let entry = [path.join(ROOT, "bin", "stowage.js"), "serve"];
    let nodeArgs = opts.nodeArgs ?? [];
    if (opts.dist) {
      const main = path.join(opts.dist, "src", "main.js");
      if (!fs.existsSync(main)) throw new Error(`--dist: ${main} does not exist (run \`npm run build\` first)`);
      entry = ["-e", `require(${JSON.stringify(main)}).run(["serve"])`];
      // The compiled build runs as `npm start` runs it: its environment and node flags (what the caller set wins),
      // NODE_ENV=production unless set.
      const start = startCommand();
      for (const [k, v] of Object.entries(start.env)) env[k] ??= v;
      nodeArgs = [...start.flags, ...nodeArgs];
      env.NODE_ENV ??= "production";
    }
    const child = spawn(process.execPath, [...nodeArgs, ...entry], { cwd: ROOT, env, stdio: ["ignore", "pipe", log] });
    fs.closeSync(log);
    let stdout = "";
    const url = await new Promise<string>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`Stowage did not start within 120 s; see ${logFile}`)), 120_000);
      child.stdout!.on("data", (d: Buffer) => {
        stdout += d.toString();
        const m = /Stowage: API (http:\/\/\S+)\/graphql/.exec(stdout);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      child.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`Stowage exited with ${code} before serving:\n${fs.readFileSync(logFile, "utf8").slice(-4000)}`));
      });
    });
    // The rest of its stdout (e.g. --trace-gc) goes to the log too.
    const out = fs.createWriteStream(logFile, { flags: "a" });
    child.stdout!.removeAllListeners("data");
    child.stdout!.pipe(out);
    const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
    return new StowageProcess(child, url, key, dataDir, logFile);
  }

  /** SIGTERM, then waits for the clean shutdown (which stops its Postgres). */
  async stop(timeoutMs = 60_000): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => this.child.once("exit", () => resolve()));
    this.child.kill("SIGTERM");
    const timer = new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), timeoutMs).unref());
    if ((await Promise.race([exited, timer])) === "timeout") {
      this.child.kill("SIGKILL");
      await exited;
    }
  }

  async gql<T = any>(query: string, variables: Record<string, unknown> = {}): Promise<T> {
    const res = await fetch(`${this.url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${this.key}` },
      body: JSON.stringify({ query, variables }),
    });
    const body = (await res.json()) as { data?: T; errors?: { message: string; extensions?: { code?: string } }[] };
    if (body.errors?.length) throw Object.assign(new Error(`GraphQL: ${body.errors.map((e) => e.message).join("; ")}`), { codes: body.errors.map((e) => e.extensions?.code) });
    return body.data!;
  }

  /** PUT of a stream of `length` bytes at `offset` of a disk. */
  put(diskId: string, offset: number, length: number, body: Readable | Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      const u = new URL(`${this.url}/v1/disks/${encodeURIComponent(diskId)}/data`);
      const req = http.request(
        {
          method: "PUT",
          hostname: u.hostname,
          port: u.port,
          path: u.pathname,
          headers: {
            authorization: `Bearer ${this.key}`,
            "content-type": "application/octet-stream",
            "content-length": String(length),
            "content-range": `bytes ${offset}-${offset + length - 1}/*`,
          },
        },
        (res) => {
          let text = "";
          res.on("data", (d) => (text += d));
          res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`PUT ${offset}+${length}: ${res.statusCode} ${text}`))));
          res.on("error", reject);
        },
      );
      req.on("error", reject);
      if (Buffer.isBuffer(body)) req.end(body);
      else {
        body.on("error", (err) => req.destroy(err));
        body.pipe(req);
      }
    });
  }

  /** SHA-256 and length of a disk's bytes, streamed. */
  sha256Disk(diskId: string): Promise<{ sha256: string; bytes: number }> {
    return new Promise((resolve, reject) => {
      const u = new URL(`${this.url}/v1/disks/${encodeURIComponent(diskId)}/data`);
      const req = http.get({ hostname: u.hostname, port: u.port, path: u.pathname, headers: { authorization: `Bearer ${this.key}` } }, (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          return reject(new Error(`GET disk data: ${res.statusCode}`));
        }
        const hash = crypto.createHash("sha256");
        let bytes = 0;
        res.on("data", (d: Buffer) => {
          hash.update(d);
          bytes += d.length;
        });
        res.on("end", () => (res.complete ? resolve({ sha256: hash.digest("hex"), bytes }) : reject(new Error("GET disk data: the response ended early"))));
        res.on("error", reject);
      });
      req.on("error", reject);
    });
  }

  async createDisk(name: string, sizeBytes: number): Promise<string> {
    const r = await this.gql(`mutation ($n: String!, $s: SafeInt!) { createDisk(input: { name: $n, sizeBytes: $s }) { disk { id } } }`, { n: name, s: sizeBytes });
    return r.createDisk.disk.id;
  }

  /** Polls a job until it ends; throws unless it SUCCEEDED. */
  async waitJob(jobId: string, pollMs = 20, timeoutMs = 3_600_000): Promise<JobInfo> {
    const deadline = Date.now() + timeoutMs;
    for (let unavailable = 0; ;) {
      let node: JobInfo;
      try {
        ({ node } = await this.gql<{ node: JobInfo }>(`query ($id: ID!) { node(id: $id) { ... on Job { status bytesDone bytesTotal createdAt startedAt finishedAt error { code message } } } }`, {
          id: jobId,
        }));
      } catch (err) {
        // A busy machine can keep the service's Postgres from answering a poll in time; the poll is asked again, as the answer says.
        if (!(err as { codes?: string[] }).codes?.includes("UNAVAILABLE") || ++unavailable > 30) throw err;
        await new Promise((r) => setTimeout(r, 1000));
        continue;
      }
      if (node.status === "SUCCEEDED") return node;
      if (node.status === "FAILED" || node.status === "CANCELLED") throw new Error(`job ${jobId} ended ${node.status}: ${node.error?.code} ${node.error?.message}`);
      if (Date.now() > deadline) throw new Error(`job ${jobId} still ${node.status} after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }
}

export interface JobInfo {
  status: string;
  bytesDone: number;
  bytesTotal: number;
  createdAt: string;
  startedAt: string | null;
  finishedAt: string | null;
  error: { code: string; message: string } | null;
}

/** One Stowage job from its mutation to SUCCEEDED. */
export interface JobTiming {
  seconds: number;
  mutationMs: number;
  /** Job createdAt → startedAt (includes the mutation's own transaction). */
  queuedMs: number;
  runMs: number;
  /** CPU seconds of the service's node process, and of its descendants (its Postgres). */
  nodeCpu: number;
  pgCpu: number;
  /** Its bounds on CLOCK_MONOTONIC in µs, the clock of node --cpu-prof. */
  window: Window;
  job: JobInfo;
}

/**
 * Runs `mutation` (which returns the job and what it made) and times the job to
 * SUCCEEDED. It is polled slowly, as frequent polls would load the service being
 * measured; the time ends at the job's finishedAt, stamped by Postgres when it
 * turned SUCCEEDED (same machine, same clock), so the poll interval does not count.
 */
export async function timeJob(svc: StowageProcess, label: string, mutation: () => Promise<{ jobId: string; result: string }>): Promise<{ timing: JobTiming; result: string }> {
  const cpu0 = cpuTree(svc.pid);
  const startUs = Number(process.hrtime.bigint() / 1000n);
  const t0 = hrSeconds();
  const wall0 = Date.now();
  const { jobId, result } = await mutation();
  const mutationMs = (hrSeconds() - t0) * 1000;
  const job = await svc.waitJob(jobId, 250);
  const observed = hrSeconds() - t0;
  const seconds = Math.min(observed, (Date.parse(job.finishedAt!) - wall0) / 1000);
  const endUs = Number(process.hrtime.bigint() / 1000n);
  const cpu1 = cpuTree(svc.pid);
  const ms = (a: string | null, b: string | null) => (a && b ? Date.parse(b) - Date.parse(a) : NaN);
  log(`Stowage ${label}: ${seconds.toFixed(2)} s`);
  return {
    timing: {
      seconds,
      mutationMs,
      queuedMs: ms(job.createdAt, job.startedAt),
      runMs: ms(job.startedAt, job.finishedAt),
      nodeCpu: cpu1.self - cpu0.self,
      pgCpu: cpu1.descendants - cpu0.descendants,
      window: { label, startUs, endUs },
      job,
    },
    result,
  };
}
