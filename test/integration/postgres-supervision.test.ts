/**
 * The embedded Postgres is supervised and never outlives its service. The service
 * runs as a real child process (`node bin/stowage.js serve`) without DATABASE_URL,
 * on its own data directory, so it starts its own cluster; the test kills, freezes
 * and thaws that cluster's postmaster, and kills and stops the service, and looks
 * at the processes in /proc.
 */
import { spawn, type ChildProcess } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

const ROOT = path.join(__dirname, "..", "..");
const BIN = path.join(ROOT, "bin", "stowage.js");
const MiB = 2 ** 20;

jest.setTimeout(240_000);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const p = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(p));
    });
  });
}

function within<T>(p: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p.finally(() => clearTimeout(timer)), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what()}`)), ms)))]);
}

/** Polls `fn` until it returns something other than undefined, or fails after `ms` with `what()`. */
async function until<T>(fn: () => Promise<T | undefined> | T | undefined, ms: number, what: () => string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms: ${what()}`);
    await sleep(100);
  }
}

/** Deterministic, incompressible bytes (AES-256-CTR keystream). */
function randomBytes(n: number, seed: string): Buffer {
  const key = crypto.createHash("sha256").update(`supervision:${seed}`).digest();
  const cipher = crypto.createCipheriv("aes-256-ctr", key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(n)), cipher.final()]);
}

/** The state letter of /proc/<pid>/stat, or undefined when there is no such process. */
function procState(pid: number): string | undefined {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3);
  } catch {
    return undefined;
  }
}

const running = (pid: number) => {
  const s = procState(pid);
  return s !== undefined && s !== "Z" && s !== "X";
};

/** Where the cluster of `dataDir` lies (`<dataDir>/postgres` may link elsewhere). */
const clusterDir = (dataDir: string) => fs.realpathSync(path.join(dataDir, "postgres"));

/** The postmaster's pid, from postmaster.pid. */
function postmasterPid(dataDir: string): number | undefined {
  try {
    const pid = Number(fs.readFileSync(path.join(clusterDir(dataDir), "postmaster.pid"), "utf8").split("\n")[0]);
    return pid > 0 ? pid : undefined;
  } catch {
    return undefined;
  }
}

/** Every live process working in the cluster's directory: Postgres changes into it, the postmaster and each of its children. */
function postgresProcesses(dataDir: string): number[] {
  const dir = clusterDir(dataDir);
  const pids: number[] = [];
  for (const name of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      if (fs.readlinkSync(`/proc/${name}/cwd`) === dir && running(Number(name))) pids.push(Number(name));
    } catch {
      // gone meanwhile, or not ours to look at
    }
  }
  return pids;
}

interface Served {
  /** What was spawned: the service itself, or the holder it runs under. */
  child: ChildProcess;
  /** The service's pid. */
  pid: number;
  url: string;
  key: string;
  output(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const children = new Set<ChildProcess>();
const dataDirs: string[] = [];

function newDataDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-pgsup-"));
  fs.chmodSync(dir, 0o755); // user postgres passes through it when the tests run as root
  dataDirs.push(dir);
  return dir;
}

/**
 * `stowage serve` with its embedded Postgres in `dataDir`; resolves once it says it
 * serves. With `holder`, it runs under a shell that then becomes `sleep`, which
 * never reaps it: killed, the service stays a zombie, as a process whose parent has
 * not reaped it yet does.
 */
async function serve(dataDir: string, port: number, opts: { holder?: boolean; env?: Record<string, string> } = {}): Promise<Served> {
  const env: NodeJS.ProcessEnv = { ...process.env, STOWAGE_DATA_DIR: dataDir, HOST: "127.0.0.1", PORT: String(port), NBD_PORT: "0", GC_INTERVAL_SECONDS: "0", ...opts.env };
  for (const name of ["DATABASE_URL", "NODE_ENV", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET", "VOLUME_BACKEND", "VAULT_BACKEND", "LOG_LEVEL"]) delete env[name];
  const child = opts.holder
    ? spawn("/bin/sh", ["-c", '"$0" "$1" serve & exec sleep 1000000', process.execPath, BIN], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] })
    : spawn(process.execPath, [BIN, "serve"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    }),
  );
  const url = await within(
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const m = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(out);
        if (m) resolve(m[1]);
      };
      child.stdout!.on("data", check);
      void exit.then((e) => reject(new Error(`serve exited (${e.code ?? e.signal}) before it was ready:\n${out}`)));
    }),
    90_000,
    () => `serve never became ready:\n${out}`,
  );
  // postgres.owner: the service's pid, then its postmaster's.
  const pid = Number(fs.readFileSync(path.join(dataDir, "postgres.owner"), "utf8").split("\n")[0]);
  if (!opts.holder) expect(pid).toBe(child.pid);
  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  return { child, pid, url, key, output: () => out, exit };
}

async function gqlRaw(svc: Served, query: string, variables?: Record<string, unknown>): Promise<{ data?: any; errors?: { message: string; extensions?: { code?: string } }[] }> {
  const res = await fetch(`${svc.url}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${svc.key}` },
    body: JSON.stringify({ query, variables }),
    signal: AbortSignal.timeout(20_000),
  });
  return (await res.json()) as { data?: any; errors?: { message: string; extensions?: { code?: string } }[] };
}

async function gql(svc: Served, query: string, variables?: Record<string, unknown>): Promise<any> {
  const body = await gqlRaw(svc, query, variables);
  if (body.errors?.length) throw new Error(`GraphQL errors: ${JSON.stringify(body.errors)}`);
  return body.data;
}

/** /readyz's status, 0 when it did not answer within 5 s. */
async function readyz(svc: Served): Promise<number> {
  try {
    return (await fetch(`${svc.url}/readyz`, { signal: AbortSignal.timeout(5_000) })).status;
  } catch {
    return 0;
  }
}

const CREATE_DISK = `mutation ($n: String!, $s: SafeInt!) { createDisk(input: { name: $n, sizeBytes: $s }) { disk { id name } } }`;
const JOB = `query ($id: ID!) { node(id: $id) { ... on Job { id status progress bytesDone error { code message } } } }`;

/** The service answers again: /readyz 200, and GraphQL writes and reads. */
async function answers(svc: Served, name: string): Promise<true | undefined> {
  if ((await readyz(svc)) !== 200) return undefined;
  const r = await gqlRaw(svc, CREATE_DISK, { n: name, s: MiB }).catch(() => undefined);
  if (!r?.data?.createDisk) return undefined;
  const read = await gqlRaw(svc, `query ($id: ID!) { node(id: $id) { ... on Disk { name } } }`, { id: r.data.createDisk.disk.id });
  return read.data?.node?.name === name ? true : undefined;
}

async function stopService(svc: Served): Promise<void> {
  svc.child.kill("SIGTERM");
  await within(svc.exit, 30_000, () => `the service did not exit on SIGTERM:\n${svc.output()}`);
}

/** A disk of `size` random bytes and a backup of it, returned once its job is RUNNING and has moved bytes. */
async function busyBackup(s: Served, name: string, size: number): Promise<{ jobId: string; backupId: string }> {
  const disk = (await gql(s, CREATE_DISK, { n: name, s: size })).createDisk.disk.id;
  const piece = 64 * MiB;
  for (let off = 0; off < size; off += piece) {
    const res = await fetch(`${s.url}/v1/disks/${disk}/data`, {
      method: "PUT",
      headers: { authorization: `Bearer ${s.key}`, "content-type": "application/octet-stream", "content-range": `bytes ${off}-${off + piece - 1}/*` },
      body: new Uint8Array(randomBytes(piece, `${name}:${off}`)),
    });
    expect(res.status).toBe(200);
  }
  const { job, backup } = (await gql(s, `mutation ($r: ID!, $n: String) { createBackup(input: { resourceId: $r, name: $n }) { job { id } backup { id } } }`, { r: disk, n: name })).createBackup;
  await until(
    async () => {
      const j = (await gql(s, JOB, { id: job.id })).node;
      if (j.status !== "QUEUED" && j.status !== "RUNNING") throw new Error(`the backup ended (${j.status}) before it could be interrupted`);
      return j.status === "RUNNING" && j.bytesDone > 0 ? j : undefined;
    },
    60_000,
    () => "the backup never got going",
  );
  return { jobId: job.id, backupId: backup.id };
}

/** Heartbeats expire only after 2 minutes: whatever ends a job in these tests, it is not that. */
const NO_STALE = { JOB_STALE_SECONDS: "120" };

let dataDir: string;
let port: number;
let svc: Served | undefined;

/** The service the first tests share, started when none runs. */
async function serving(): Promise<Served> {
  if (!svc || svc.child.exitCode !== null || svc.child.signalCode !== null) svc = await serve(dataDir, port, { env: NO_STALE });
  return svc;
}

beforeAll(async () => {
  dataDir = newDataDir();
  port = await freePort();
});

afterAll(async () => {
  for (const child of [...children]) {
    const gone = new Promise((r) => child.once("exit", r));
    child.kill("SIGKILL");
    await within(gone, 5_000, () => `child ${child.pid} did not exit on SIGKILL`).catch(() => undefined);
  }
  // A Postgres left behind by a failed test must not outlive the run either.
  for (const dir of dataDirs) {
    for (const pid of fs.existsSync(path.join(dir, "postgres")) ? postgresProcesses(dir) : []) process.kill(pid, "SIGKILL");
    fs.rmSync(clusterDir(dir), { recursive: true, force: true });
    fs.rmSync(dir, { recursive: true, force: true });
  }
}, 60_000);

it("a killed postmaster is logged and restarted, and the service answers again without an operator", async () => {
  const s = await serving();
  expect(await answers(s, "before-kill")).toBe(true);
  const first = postmasterPid(dataDir)!;
  expect(running(first)).toBe(true);

  process.kill(first, "SIGKILL");
  await until(
    () => (/embedded Postgres exited unexpectedly/.test(s.output()) ? true : undefined),
    10_000,
    () => `the death was not logged:\n${s.output()}`,
  );
  const death = JSON.parse(
    s
      .output()
      .split("\n")
      .find((l) => l.includes("embedded Postgres exited unexpectedly"))!,
  );
  expect(death).toMatchObject({ level: "error", pid: first, signal: "SIGKILL" });

  // While it is down, requests fail UNAVAILABLE (or already succeed again): never INTERNAL.
  const during = await gqlRaw(s, CREATE_DISK, { n: "during-restart", s: MiB });
  for (const e of during.errors ?? []) expect(e.extensions?.code).toBe("UNAVAILABLE");

  await until(
    () => answers(s, "after-kill"),
    30_000,
    () => `the service did not come back:\n${s.output()}`,
  );
  const second = postmasterPid(dataDir)!;
  expect(second).not.toBe(first);
  expect(running(second)).toBe(true);
  expect(running(first)).toBe(false);
  // The supervisor logs the restart once its own check connects, which may be a moment after the pool did.
  await until(
    () => (/embedded Postgres restarted/.test(s.output()) ? true : undefined),
    10_000,
    () => `the restart was not logged:\n${s.output()}`,
  );
  // The job event listener listens again too.
  await until(
    () => (/event listener reconnected/.test(s.output()) ? true : undefined),
    30_000,
    () => `the event listener did not reconnect:\n${s.output()}`,
  );
});

it("a job running when the postmaster dies ends once it is back, without waiting for its heartbeat to expire", async () => {
  const s = await serving();
  await until(
    () => answers(s, "before-job-kill"),
    30_000,
    () => `the service does not answer:\n${s.output()}`,
  );
  const { jobId, backupId } = await busyBackup(s, "interrupted", 256 * MiB);
  const restarts = s.output().split("embedded Postgres restarted").length;
  process.kill(postmasterPid(dataDir)!, "SIGKILL");
  await until(
    () => (s.output().split("embedded Postgres restarted").length > restarts ? true : undefined),
    30_000,
    () => `Postgres was not restarted:\n${s.output()}`,
  );
  await until(
    () => answers(s, "after-job-kill"),
    30_000,
    () => `the service did not come back:\n${s.output()}`,
  );
  // Either the job lost the database and failed INTERRUPTED, or it rode the restart out and
  // finished: never INTERNAL, never left RUNNING until its heartbeat would have expired.
  const job = await until(
    async () => {
      const j = (await gql(s, JOB, { id: jobId })).node;
      return j.status === "RUNNING" ? undefined : j;
    },
    20_000,
    () => `the job stayed RUNNING after the database came back:\n${s.output()}`,
  );
  const backup = (await gql(s, `query ($id: ID!) { node(id: $id) { ... on Backup { status } } }`, { id: backupId })).node;
  if (job.status === "FAILED") {
    expect(job.error).toEqual({ code: "INTERRUPTED", message: expect.stringMatching(/database/) });
    expect(backup.status).toBe("ERROR");
  } else {
    expect(job.status).toBe("SUCCEEDED");
    expect(backup.status).toBe("AVAILABLE");
  }
});

it("a frozen postmaster makes /readyz answer 503 within 2 s; thawed, the service recovers", async () => {
  const s = await serving();
  await until(
    () => answers(s, "before-freeze"),
    30_000,
    () => `the service does not answer:\n${s.output()}`,
  );
  const pid = postmasterPid(dataDir)!;
  // Freezing the postmaster alone would leave the open connections' backends answering.
  const all = postgresProcesses(dataDir);
  expect(all).toContain(pid);
  for (const p of all) process.kill(p, "SIGSTOP");
  try {
    const started = Date.now();
    const res = await fetch(`${s.url}/readyz`, { signal: AbortSignal.timeout(10_000) });
    const took = Date.now() - started;
    expect(res.status).toBe(503);
    expect(took).toBeLessThan(2_000 + 1_000); // its own 2 s limit, and the request's way there and back
  } finally {
    for (const p of all) process.kill(p, "SIGCONT");
  }
  await until(
    () => answers(s, "after-thaw"),
    30_000,
    () => `the service did not recover after SIGCONT:\n${s.output()}`,
  );
  // Frozen is not dead: the same postmaster serves on.
  expect(postmasterPid(dataDir)).toBe(pid);
  expect(running(pid)).toBe(true);
});

it("SIGTERM stops the service's Postgres before the service exits", async () => {
  const s = await serving();
  await until(
    () => answers(s, "before-term"),
    30_000,
    () => `the service does not answer:\n${s.output()}`,
  );
  expect(postgresProcesses(dataDir).length).toBeGreaterThan(0);
  await stopService(s);
  expect(postgresProcesses(dataDir)).toEqual([]);
  expect(fs.existsSync(path.join(clusterDir(dataDir), "postmaster.pid"))).toBe(false);
  svc = undefined;
});

it("SIGKILLed, the service takes its Postgres with it", async () => {
  // Under a holder that never reaps it, so nothing but the kernel's parent-death signal can tell Postgres.
  const s = await serve(dataDir, port, { holder: true });
  try {
    await until(
      () => answers(s, "before-sigkill"),
      30_000,
      () => `the service does not answer:\n${s.output()}`,
    );
    const pids = postgresProcesses(dataDir);
    expect(pids).toContain(postmasterPid(dataDir));
    process.kill(s.pid, "SIGKILL");
    await until(
      () => (postgresProcesses(dataDir).length === 0 ? true : undefined),
      30_000,
      () => `Postgres outlived its service: ${postgresProcesses(dataDir).join(", ")}`,
    );
    for (const pid of pids) expect(running(pid)).toBe(false);
    expect(procState(s.pid)).toBe("Z");
  } finally {
    s.child.kill("SIGKILL");
    await s.exit;
  }
});

it("killed mid-job and restarted at once, the service fails the job INTERRUPTED at start-up, and the first run's Postgres is gone", async () => {
  const dir = newDataDir();
  const p = await freePort();
  // Heartbeats would expire only after 2 minutes: whatever ends the job here, it is not that.
  const env = NO_STALE;
  const first = await serve(dir, p, { holder: true, env });
  const job = { id: (await busyBackup(first, "killed", 256 * MiB)).jobId };
  const firstProcesses = postgresProcesses(dir);
  expect(firstProcesses).toContain(postmasterPid(dir));

  process.kill(first.pid, "SIGKILL");
  await until(
    () => (running(first.pid) ? undefined : true),
    5_000,
    () => "the service did not die on SIGKILL",
  );
  // Its parent has not reaped it: a zombie, which a liveness check by signal 0 takes for alive.
  expect(procState(first.pid)).toBe("Z");
  const second = await serve(dir, p, { env });
  try {
    // Ready means the runner has started: the job ended then, not when its heartbeat would have expired.
    const j = (await gql(second, JOB, { id: job.id })).node;
    expect(j.status).toBe("FAILED");
    expect(j.error.code).toBe("INTERRUPTED");
    const backup = (await gql(second, `{ backups(first: 10) { edges { node { name status } } } }`)).backups.edges.map((e: any) => e.node);
    expect(backup).toEqual([expect.objectContaining({ name: "killed", status: "ERROR" })]);
    // Nothing of the first run's Postgres is left: the cluster now running is the second service's alone.
    for (const pid of firstProcesses) expect(running(pid)).toBe(false);
    const owner = fs.readFileSync(path.join(dir, "postgres.owner"), "utf8").split("\n").map(Number);
    expect(owner).toEqual([second.pid, postmasterPid(dir), 0]);
    expect(second.output()).not.toMatch(/joined the embedded Postgres/);
    expect(await answers(second, "after-restart")).toBe(true);
  } finally {
    await stopService(second);
    first.child.kill("SIGKILL"); // the holder; the zombie goes with it
    await first.exit;
  }
  expect(postgresProcesses(dir)).toEqual([]);
});
