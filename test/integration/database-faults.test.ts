/**
 * The database may freeze or go away. The service runs as a real child process
 * whose DATABASE_URL leads through a TCP proxy the test controls: frozen, the
 * proxy holds every byte; gone, it refuses and drops connections. /readyz says
 * so within 2 s, requests end instead of hanging, and the service comes back by
 * itself when the database does.
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { createTestDatabase, type TestDatabase } from "../helpers/db";

const ROOT = path.join(__dirname, "..", "..");
jest.setTimeout(180_000);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A TCP proxy to Postgres that can hold its traffic (frozen) or refuse it (gone). */
class Proxy {
  private server: net.Server | null = null;
  private readonly pairs = new Set<[net.Socket, net.Socket]>();
  frozen = false;
  port = 0;

  constructor(private readonly target: { host: string; port: number }) {}

  async open(port = 0): Promise<void> {
    this.server = net.createServer((client) => {
      const upstream = net.connect(this.target.port, this.target.host);
      const pair: [net.Socket, net.Socket] = [client, upstream];
      this.pairs.add(pair);
      const drop = () => {
        client.destroy();
        upstream.destroy();
        this.pairs.delete(pair);
      };
      client.on("error", drop).on("close", drop);
      upstream.on("error", drop).on("close", drop);
      // Bytes pass only while the proxy is not frozen; held ones pass once it thaws.
      const forward = (from: net.Socket, to: net.Socket) => {
        from.on("data", (d) => {
          if (this.frozen) from.pause();
          to.write(d);
        });
      };
      forward(client, upstream);
      forward(upstream, client);
      if (this.frozen) {
        client.pause();
        upstream.pause();
      }
    });
    await new Promise<void>((resolve) => this.server!.listen(port, "127.0.0.1", resolve));
    this.port = (this.server!.address() as net.AddressInfo).port;
  }

  freeze(): void {
    this.frozen = true;
    for (const [a, b] of this.pairs) {
      a.pause();
      b.pause();
    }
  }

  thaw(): void {
    this.frozen = false;
    for (const [a, b] of this.pairs) {
      a.resume();
      b.resume();
    }
  }

  /** Closes the listener and every connection: the database is gone. */
  async close(): Promise<void> {
    for (const [a, b] of this.pairs) {
      a.destroy();
      b.destroy();
    }
    this.pairs.clear();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    this.server = null;
  }
}

let db: TestDatabase;
let proxy: Proxy;
let child: ChildProcess | null = null;
let dataDir: string;

afterAll(async () => {
  if (child && child.exitCode === null) {
    const gone = new Promise((r) => child!.once("exit", r));
    child.kill("SIGKILL");
    await gone;
  }
  await proxy?.close();
  await db?.drop();
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
});

/** One request, and how long its answer took; a request still unanswered after `limitMs` is reported as such. */
async function timed(url: string, init: RequestInit = {}, limitMs = 30_000): Promise<{ status: number | "no answer"; ms: number; body: string }> {
  const start = Date.now();
  try {
    const res = await fetch(url, { ...init, signal: AbortSignal.timeout(limitMs) });
    const body = await res.text();
    return { status: res.status, ms: Date.now() - start, body };
  } catch {
    return { status: "no answer", ms: Date.now() - start, body: "" };
  }
}

async function until(what: string, check: () => Promise<boolean>, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await sleep(100);
  }
}

it("answers /readyz 503 within 2 s while the database is frozen or gone, ends requests instead of hanging, and is ready again when it is back", async () => {
  db = await createTestDatabase();
  const target = new URL(db.url);
  proxy = new Proxy({ host: target.hostname, port: Number(target.port) });
  await proxy.open();
  const via = new URL(db.url);
  via.hostname = "127.0.0.1";
  via.port = String(proxy.port);
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-dbfault-"));

  const env: NodeJS.ProcessEnv = {
    ...process.env,
    DATABASE_URL: via.toString(),
    STOWAGE_DATA_DIR: dataDir,
    HOST: "127.0.0.1",
    PORT: "0",
    NBD_PORT: "0",
    DB_STATEMENT_TIMEOUT_SECONDS: "3",
    DB_ACQUIRE_TIMEOUT_SECONDS: "2",
    SCHEDULER_INTERVAL_SECONDS: "0",
    GC_INTERVAL_SECONDS: "0",
  };
  for (const name of ["NODE_ENV", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET", "LOG_LEVEL"]) delete env[name];
  child = spawn(process.execPath, [path.join(ROOT, "bin", "stowage.js"), "serve"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (out += d));
  await until("the service serves", async () => /^Stowage: API (http:\/\/\S+)\/graphql/m.test(out), 90_000);
  const base = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(out)![1];
  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  // A query that reads the database (the key itself is known for KEY_CACHE_MS once seen).
  const viewer = () =>
    timed(`${base}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
      body: JSON.stringify({ query: "{ viewer { name } servers { totalCount } }" }),
    });

  expect((await timed(`${base}/readyz`)).status).toBe(200);
  expect((await viewer()).status).toBe(200);

  // Frozen: nothing comes back from the database.
  proxy.freeze();
  const frozen = await timed(`${base}/readyz`);
  expect(frozen.status).toBe(503);
  expect(frozen.ms).toBeLessThan(2500);
  expect(frozen.body).toMatch(/does not answer/);
  // A request ends, as an error, instead of waiting for ever.
  const stuck = await viewer();
  expect(stuck.status).not.toBe("no answer");
  expect(stuck.ms).toBeLessThan(15_000);
  expect(stuck.body).not.toMatch(/SELECT|postgres|at .*\.ts/);
  // Not a bug of the service: the caller is told to try again.
  expect(JSON.parse(stuck.body).errors[0].extensions.code).toBe("UNAVAILABLE");
  expect((await timed(`${base}/healthz`)).status).toBe(200);

  proxy.thaw();
  await until("ready again after the thaw", async () => (await timed(`${base}/readyz`)).status === 200, 20_000);
  await until("queries again after the thaw", async () => (await viewer()).status === 200, 20_000);

  // Gone: connections are refused and the open ones dropped.
  const port = proxy.port;
  await proxy.close();
  const gone = await timed(`${base}/readyz`);
  expect(gone.status).toBe(503);
  expect(gone.ms).toBeLessThan(2500);
  await proxy.open(port);
  await until("ready again once the database is back", async () => (await timed(`${base}/readyz`)).status === 200, 30_000);
  expect((await viewer()).status).toBe(200);

  child.kill("SIGTERM");
  await until("the service exits on SIGTERM", async () => child!.exitCode !== null, 20_000);
});
