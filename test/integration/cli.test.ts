/**
 * The real CLI, end to end: `node bin/stowage.js …` as child processes on one
 * temporary data directory with embedded Postgres (DATABASE_URL removed).
 * The tests run in order and share that directory: first serve, a project created
 * beside it, SIGTERM, a project created with nothing running, a second serve, demo
 * data, then a bad configuration.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

const ROOT = path.join(__dirname, "..", "..");
const BIN = path.join(ROOT, "bin", "stowage.js");
const STACK_LINE = /^\s+at .+:\d+:\d+\)?$/m;
const KEY = /stw_[A-Za-z0-9_-]+/g;

jest.setTimeout(60_000);

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

interface Cli {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  exit: Promise<Exit>;
}

interface Served extends Cli {
  url: string;
  startMs: number;
}

const children = new Set<ChildProcess>();
let dataDir: string;
let port: number;

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

/** The environment of a plain `npm start`: no DATABASE_URL (embedded Postgres), no NODE_ENV=test from jest. */
function cliEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, STOWAGE_DATA_DIR: dataDir, PORT: String(port), HOST: "127.0.0.1", NBD_PORT: "0", ...extra };
  for (const name of ["DATABASE_URL", "NODE_ENV", "LOG_LEVEL", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET"]) delete env[name];
  return env;
}

function spawnCli(args: string[], extra: Record<string, string> = {}): Cli {
  const child = spawn(process.execPath, [BIN, ...args], { cwd: ROOT, env: cliEnv(extra), stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let out = "";
  let err = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
  const exit = new Promise<Exit>((resolve) => {
    child.once("close", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    });
  });
  return { child, stdout: () => out, stderr: () => err, exit };
}

function timeout<T>(p: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([
    p.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what()}`)), ms);
    }),
  ]);
}

/** Runs a one-shot command to its end. */
async function runCli(args: string[], extra: Record<string, string> = {}, ms = 30_000) {
  const cli = spawnCli(args, extra);
  const { code, signal } = await timeout(cli.exit, ms, () => `stowage ${args.join(" ")}\nstderr: ${cli.stderr()}`);
  return { code, signal, stdout: cli.stdout(), stderr: cli.stderr() };
}

/** Starts `serve` and resolves once it prints "Stowage: API <url>/graphql"; fails if it exits first. */
async function startServe(args: string[] = [], ms = 45_000): Promise<Served> {
  const t0 = Date.now();
  const cli = spawnCli(["serve", ...args]);
  const url = await timeout(
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const m = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(cli.stdout());
        if (m) {
          cli.child.stdout!.off("data", check);
          resolve(m[1]);
        }
      };
      cli.child.stdout!.on("data", check);
      check();
      void cli.exit.then((e) => reject(new Error(`serve exited (${e.code ?? e.signal}) before it was ready\nstdout: ${cli.stdout()}\nstderr: ${cli.stderr()}`)));
    }),
    ms,
    () => `serve never printed "Stowage: API"\nstdout: ${cli.stdout()}\nstderr: ${cli.stderr()}`,
  );
  return { ...cli, url, startMs: Date.now() - t0 };
}

/** SIGTERM, then waits for the exit; measures how long it took. */
async function terminate(cli: Cli, ms = 20_000): Promise<Exit & { ms: number }> {
  const t0 = Date.now();
  cli.child.kill("SIGTERM");
  const e = await timeout(cli.exit, ms, () => `no exit after SIGTERM\nstderr: ${cli.stderr()}`);
  return { ...e, ms: Date.now() - t0 };
}

async function gql<T = any>(url: string, key: string, query: string, variables?: Record<string, unknown>): Promise<{ status: number; data?: T; errors?: { message: string }[] }> {
  const res = await fetch(`${url}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
    body: JSON.stringify({ query, variables }),
  });
  return { status: res.status, ...((await res.json()) as object) };
}

async function viewerName(url: string, key: string): Promise<string | undefined> {
  const r = await gql<{ viewer: { name: string } }>(url, key, "{ viewer { name } }");
  return r.data?.viewer.name;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

const pidFile = () => path.join(dataDir, "postgres", "postmaster.pid");

/** The pid of the embedded cluster of the data dir, if one runs. */
function postgresPid(): number | undefined {
  try {
    const pid = Number(fs.readFileSync(pidFile(), "utf8").split("\n")[0]);
    return pid && pidAlive(pid) ? pid : undefined;
  } catch {
    return undefined;
  }
}

const lastLine = (s: string) => s.trimEnd().split("\n").pop() ?? "";
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-cli-"));
  fs.chmodSync(dataDir, 0o755); // Postgres runs as user postgres when we are root
  port = await freePort();
});

afterAll(async () => {
  // Whatever a failed test left running: Stowage processes first (they stop the
  // cluster they own), then any cluster still on the data directory.
  for (const child of [...children]) {
    const gone = new Promise((r) => child.once("close", r));
    child.kill("SIGTERM");
    if (!(await Promise.race([gone.then(() => true), sleep(10_000).then(() => false)]))) {
      child.kill("SIGKILL");
      await Promise.race([gone, sleep(2_000)]);
    }
  }
  const pg = dataDir ? postgresPid() : undefined;
  if (pg) {
    process.kill(pg, "SIGINT");
    for (let i = 0; i < 100 && pidAlive(pg); i++) await sleep(100);
    if (pidAlive(pg)) process.kill(pg, "SIGKILL");
  }
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
}, 30_000);

describe("stowage CLI with embedded Postgres", () => {
  let first: Served;
  let second: Served;
  let defaultKey: string;
  let acmeKey: string;
  let otherKey: string;

  test("1. first serve prints the default key once, writes it 0600, and the key works", async () => {
    first = await startServe();
    const out = first.stdout();
    const keys = out.match(KEY) ?? [];
    expect(keys).toHaveLength(1);
    defaultKey = keys[0]!;
    expect(out.split('Created project "default"').length - 1).toBe(1);

    const file = path.join(dataDir, "default-api-key");
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
    expect(fs.readFileSync(file, "utf8").trim()).toBe(defaultKey);

    expect(await viewerName(first.url, defaultKey)).toBe("default");
    const denied = await gql(first.url, "stw_not-a-key", "{ viewer { name } }");
    expect(denied.status).toBe(401);

    const page = await fetch(`${first.url}/`);
    expect(page.status).toBe(200);
    expect(page.headers.get("content-type")).toMatch(/text\/html/);
    expect(await page.text()).toMatch(/<html/i);
    // Logs are JSON lines on stderr, never on stdout.
    expect(first.stderr()).toContain('"msg":"embedded Postgres started"');
  });

  test("2. project create beside the running server joins its cluster; a duplicate fails cleanly", async () => {
    const pgBefore = postgresPid();
    expect(pgBefore).toBeDefined();

    const created = await runCli(["project", "create", "acme"]);
    expect(created.stderr).not.toMatch(STACK_LINE);
    expect(created.code).toBe(0);
    acmeKey = lastLine(created.stdout);
    expect(acmeKey).toMatch(/^stw_[A-Za-z0-9_-]+$/);
    // It used the server's cluster and left it running.
    expect(postgresPid()).toBe(pgBefore);
    expect(await viewerName(first.url, acmeKey)).toBe("acme");

    // Some data to find again after a restart.
    const made = await gql(first.url, acmeKey, `mutation { createServer(input: { name: "survivor", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: 1073741824 }) { server { id name } } }`);
    expect(made.errors).toBeUndefined();
    expect(made.data.createServer.server.name).toBe("survivor");

    const dup = await runCli(["project", "create", "acme"]);
    expect(dup.code).not.toBe(0);
    expect(dup.code).not.toBeNull();
    expect(dup.stderr).toContain('project "acme" already exists');
    expect(dup.stderr).not.toMatch(STACK_LINE);
    expect(dup.stdout).not.toMatch(KEY);
    expect(postgresPid()).toBe(pgBefore);
  });

  test("3. SIGTERM drains, exits 0 and stops the embedded Postgres", async () => {
    const pg = postgresPid();
    expect(pg).toBeDefined();
    const e = await terminate(first);
    expect(e).toMatchObject({ code: 0, signal: null });
    expect(e.ms).toBeLessThan(15_000);
    expect(first.stderr()).toContain('"msg":"shutting down"');
    expect(first.stderr()).not.toContain('"level":"error"');
    expect(pidAlive(pg!)).toBe(false);
    expect(fs.existsSync(pidFile())).toBe(false);
  });

  test("4. project create with nothing running starts and stops the cluster itself", async () => {
    expect(postgresPid()).toBeUndefined();
    const created = await runCli(["project", "create", "other"]);
    expect(created.stderr).not.toMatch(STACK_LINE);
    expect(created.code).toBe(0);
    otherKey = lastLine(created.stdout);
    expect(otherKey).toMatch(/^stw_[A-Za-z0-9_-]+$/);
    expect(created.stderr).toContain('"msg":"embedded Postgres started"');
    expect(fs.existsSync(pidFile())).toBe(false);
    expect(postgresPid()).toBeUndefined();
  });

  test("5. second serve prints no new key; old keys and data survive", async () => {
    second = await startServe();
    expect(second.stdout()).not.toMatch(KEY);
    expect(second.stdout()).not.toContain("Created project");
    expect(fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim()).toBe(defaultKey);

    expect(await viewerName(second.url, defaultKey)).toBe("default");
    expect(await viewerName(second.url, acmeKey)).toBe("acme");
    expect(await viewerName(second.url, otherKey)).toBe("other");

    const acme = await gql(second.url, acmeKey, "{ servers { totalCount nodes { name } } }");
    expect(acme.data.servers).toEqual({ totalCount: 1, nodes: [{ name: "survivor" }] });
    const def = await gql(second.url, defaultKey, "{ servers { totalCount } }");
    expect(def.data.servers.totalCount).toBe(0);
  });

  test("6. demo fills project default (once) while the server runs", async () => {
    const demo = await runCli(["demo"]);
    expect(demo.stderr).not.toMatch(STACK_LINE);
    expect(demo.code).toBe(0);
    expect(demo.stdout).toMatch(/Demo data added to project "default"/);
    expect(demo.stdout).not.toMatch(KEY); // default exists already: no new key

    const query = `{
      servers { totalCount }
      policies { nodes { name enabled nextRunAt } }
      disks(first: 100) { nodes { name type device server { name } } }
    }`;
    const r = await gql(second.url, defaultKey, query);
    expect(r.errors).toBeUndefined();
    expect(r.data.servers.totalCount).toBeGreaterThanOrEqual(3);
    const scheduled = r.data.policies.nodes.filter((p: { nextRunAt: string | null }) => p.nextRunAt);
    expect(scheduled.length).toBeGreaterThanOrEqual(1);
    for (const p of scheduled) expect(Date.parse(p.nextRunAt)).toBeGreaterThan(Date.now());
    const attached = r.data.disks.nodes.filter((d: { server: unknown }) => d.server);
    expect(attached.length).toBeGreaterThanOrEqual(3);
    for (const d of attached) expect(d.device).toMatch(/^\/dev\/\w+$/);
    // Other projects see none of it.
    const acme = await gql(second.url, acmeKey, "{ servers { totalCount } }");
    expect(acme.data.servers.totalCount).toBe(1);

    const again = await runCli(["demo"]);
    expect(again.code).toBe(0);
    expect(again.stdout).toContain("already has servers");
    const after = await gql(second.url, defaultKey, "{ servers { totalCount } }");
    expect(after.data.servers.totalCount).toBe(r.data.servers.totalCount);
  });

  test("the second serve stops cleanly as well and leaves no Postgres running", async () => {
    const pg = postgresPid();
    expect(pg).toBeDefined();
    const e = await terminate(second);
    expect(e).toMatchObject({ code: 0, signal: null });
    expect(pidAlive(pg!)).toBe(false);
    expect(postgresPid()).toBeUndefined();
  });

  test("7. an invalid PORT exits non-zero with one line naming PORT, before touching anything", async () => {
    const fresh = path.join(dataDir, "never-created");
    const r = await runCli(["serve"], { PORT: "abc", STOWAGE_DATA_DIR: fresh });
    expect(r.code).toBe(1);
    expect(r.stdout).toBe("");
    const lines = r.stderr.trim().split("\n");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/PORT/);
    expect(lines[0]).toContain('"abc"');
    expect(r.stderr).not.toMatch(STACK_LINE);
    expect(fs.existsSync(fresh)).toBe(false);
  });

  test("8. an NBD port in use exits non-zero with one line naming NBD_PORT", async () => {
    const busy = net.createServer();
    await new Promise<void>((resolve) => busy.listen(0, "127.0.0.1", () => resolve()));
    try {
      const r = await runCli(["serve"], { NBD_PORT: String((busy.address() as net.AddressInfo).port), STOWAGE_DATA_DIR: path.join(dataDir, "nbd-busy") });
      expect(r.code).toBe(1);
      const lines = r.stderr
        .trim()
        .split("\n")
        .filter((l) => !l.startsWith("{"));
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/^cannot listen on 127\.0\.0\.1:\d+: .*EADDRINUSE.* \(set NBD_HOST or NBD_PORT; NBD_PORT=0 turns NBD off\)$/);
      expect(r.stderr).not.toMatch(STACK_LINE);
    } finally {
      busy.close();
    }
  });
});
