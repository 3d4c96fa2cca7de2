import { execFile, spawn, type ChildProcess } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import type { Logger } from "../logger";
import { processAlive } from "../processes";
import { binary, blockedAt, EmbeddedPostgresError, reachableInstall, type PostgresIds } from "./postgres-binaries";

export { EmbeddedPostgresError } from "./postgres-binaries";

export interface PostgresHandle {
  /** Connection string of the cluster's `postgres` database. */
  url: string;
  /**
   * True when this process started the cluster and must stop it. No other process
   * was connected to it then: a job RUNNING before it started has nobody left to run it.
   */
  owned: boolean;
  /** Calls `listener` whenever the cluster has been restarted after it died (only an owned cluster is). */
  onRestart(listener: () => void): void;
  stop(): Promise<void>;
}

/**
 * Root's place for what user postgres must reach but cannot where it lies: the copy
 * of the binaries when node_modules is closed to it, and the clusters of data
 * directories it cannot enter (`<dataDir>/postgres` then links to one).
 */
const RUNTIME_DIR = "/var/lib/stowage";

const execFileAsync = promisify(execFile);
const isRoot = () => typeof process.getuid === "function" && process.getuid() === 0;

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
  if (!processAlive(pid)) return false;
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
  // A service SIGKILLed a moment ago may not be reaped yet: a zombie owns nothing.
  return !processAlive(owner);
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
//  - SIGKILL (an OOM kill): on Linux Postgres runs under `setpriv --pdeathsig INT`,
//    so the kernel sends it the fast-shutdown signal when this process dies. Where
//    that is missing, the next Stowage process on the data directory sees from
//    `postgres.owner` that its owner is gone, stops the cluster and starts its own.
// A postmaster that dies while this process still wants it is started again, on
// the same port (the pools' connection strings name it), after a growing delay.
// ---------------------------------------------------------------------------

interface OwnedCluster {
  child: ChildProcess;
  exited: Promise<void>;
  dataDir: string;
  /** Its end was asked for: an exit is no crash. */
  stopRequested: boolean;
}

const owned = new Set<OwnedCluster>();
const TERMINATION_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;
let signalHandlers: Map<NodeJS.Signals, () => void> | undefined;
let exitingOnSignal = false;

function running(c: OwnedCluster): boolean {
  return c.child.exitCode === null && c.child.signalCode === null;
}

function onProcessExit() {
  for (const c of owned) {
    c.stopRequested = true;
    if (running(c)) c.child.kill("SIGINT");
  }
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
  c.stopRequested = true;
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

/**
 * util-linux's setpriv (every Debian and most Linux systems have it), to start
 * Postgres with a parent-death signal: the kernel sends it SIGINT, a fast
 * shutdown, when the thread that spawned it ends, and Node spawns from its main
 * thread, which lives as long as the process.
 */
function deathSignalWrapper(): string | undefined {
  if (process.platform !== "linux") return undefined;
  return ["/usr/bin/setpriv", "/bin/setpriv"].find((file) => fs.existsSync(file));
}

/** A program that could not be started at all, and what to do about it. */
function spawnFailure(file: string, err: NodeJS.ErrnoException, ids: PostgresIds | undefined): EmbeddedPostgresError {
  const who = ids ? `user postgres (uid ${ids.uid})` : "this user";
  return new EmbeddedPostgresError(
    `embedded Postgres could not run ${file} as ${who} (${err.code ?? err.message}): make it, and every directory above it, executable for that user, or set DATABASE_URL to use an external Postgres`,
  );
}

function unreachable(dir: string, blocked: string): EmbeddedPostgresError {
  const mode = (fs.statSync(blocked).mode & 0o777).toString(8).padStart(4, "0");
  return new EmbeddedPostgresError(
    `embedded Postgres runs as user postgres, which cannot enter ${blocked} (mode ${mode}) to reach its data in ${dir}: move the data directory (STOWAGE_DATA_DIR) where that user can reach it, let it pass (chmod o+x ${blocked}), or set DATABASE_URL to use an external Postgres`,
  );
}

/** Starts postgres on `port`; resolves once it accepts connections, rejects with its last log lines otherwise. */
async function startCluster(dataDir: string, pgDir: string, port: number, password: string, logger: Logger): Promise<OwnedCluster> {
  // Postgres is given the cluster's real path: it never passes through the data
  // directory when `<dataDir>/postgres` links elsewhere.
  const clusterDir = fs.realpathSync(pgDir);
  // Postgres refuses to run as root; it runs as the owner of its data directory
  // (the `postgres` user initCluster created and gave it to).
  let ids: PostgresIds | undefined;
  if (isRoot()) {
    const st = fs.statSync(clusterDir);
    ids = { uid: st.uid, gid: st.gid };
    const blocked = blockedAt(clusterDir, ids);
    if (blocked) throw unreachable(clusterDir, blocked);
  }
  const postgres = binary(await reachableInstall(ids, RUNTIME_DIR, logger), "postgres");
  // setpriv runs as the postgres user already (spawn changes the user before it
  // runs it), so the death signal it sets survives: only a change of user resets it.
  const setpriv = deathSignalWrapper();
  if (!setpriv) logger.debug("setpriv not found: should this process be killed, the next start stops its Postgres");
  const args = [
    "-D",
    clusterDir,
    "-p",
    String(port),
    // TCP on loopback only; no Unix socket, whose path would collide between clusters.
    "-c",
    "listen_addresses=127.0.0.1",
    "-c",
    "unix_socket_directories=",
    "-c",
    "max_connections=200",
  ];
  const child = spawn(setpriv ?? postgres, setpriv ? ["--pdeathsig", "INT", "--", postgres, ...args] : args, {
    // Its own process group: Ctrl-C in a terminal reaches Stowage, which drains
    // and then stops Postgres, instead of Postgres dropping every session at once.
    detached: process.platform !== "win32", // (on Windows it would open a console window)
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, LC_MESSAGES: "C" },
    cwd: path.dirname(clusterDir), // the caller's may be closed to the postgres user
    ...ids,
  });
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
  let spawnError: NodeJS.ErrnoException | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once("exit", () => resolve());
    child.once("error", (err) => {
      spawnError = err;
      resolve();
    });
  });
  const cluster: OwnedCluster = { child, exited, dataDir, stopRequested: false };
  owned.add(cluster);
  installHooks();

  const deadline = Date.now() + 60_000;
  for (;;) {
    if (spawnError) {
      await stopCluster(cluster);
      throw spawnFailure(postgres, spawnError, ids);
    }
    if (!running(cluster)) {
      await stopCluster(cluster);
      const why = tail.filter((l) => /FATAL|ERROR|PANIC|could not|failed to execute/i.test(l)).join("; ");
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

/** Delays before restarting a postmaster that died: doubling from the first to the longest. */
const RESTART_FIRST_MS = 500;
const RESTART_LONGEST_MS = 30_000;
/** A postmaster that stayed up this long was healthy: should it die, the next restart waits the first delay again. */
const STAYED_UP_MS = 60_000;

/**
 * The cluster this process started, restarted whenever its postmaster dies
 * without being asked to (killed, crashed), until `stop()`.
 */
class SupervisedCluster {
  private delayMs = RESTART_FIRST_MS;
  private upSince = Date.now();
  private timer: NodeJS.Timeout | undefined;
  private restarting: Promise<void> | undefined;
  private stopped = false;
  private readonly listeners = new Set<() => void>();

  constructor(
    private current: OwnedCluster,
    private readonly port: number,
    private readonly startAgain: () => Promise<OwnedCluster>,
    private readonly logger: Logger,
  ) {
    this.watch(current);
  }

  onRestart(listener: () => void): void {
    this.listeners.add(listener);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.restarting;
    await stopCluster(this.current);
  }

  private watch(c: OwnedCluster): void {
    void c.exited.then(() => {
      if (this.stopped || c.stopRequested) return;
      owned.delete(c);
      if (Date.now() - this.upSince >= STAYED_UP_MS) this.delayMs = RESTART_FIRST_MS;
      const delay = this.schedule();
      this.logger.error("embedded Postgres exited unexpectedly; restarting it", { pid: c.child.pid, exitCode: c.child.exitCode, signal: c.child.signalCode, port: this.port, restartInMs: delay });
    });
  }

  /** Restarts after the current delay, and doubles the next one; returns the delay. */
  private schedule(): number {
    const delay = this.delayMs;
    this.delayMs = Math.min(this.delayMs * 2, RESTART_LONGEST_MS);
    this.timer = setTimeout(() => {
      this.restarting = this.restart().finally(() => (this.restarting = undefined));
    }, delay);
    this.timer.unref();
    return delay;
  }

  private async restart(): Promise<void> {
    let c: OwnedCluster;
    try {
      c = await this.startAgain();
    } catch (err) {
      // Its old processes may still hold the shared memory or the port a moment longer.
      if (!this.stopped) this.logger.error("restarting embedded Postgres failed; trying again", { error: (err as Error).message, port: this.port, restartInMs: this.schedule() });
      return;
    }
    if (this.stopped) return stopCluster(c);
    this.current = c;
    this.upSince = Date.now();
    this.watch(c);
    this.logger.info("embedded Postgres restarted", { pid: c.child.pid, port: this.port });
    for (const listener of this.listeners) listener();
  }
}

/** The `postgres` user root runs Postgres as, created when missing. */
async function postgresUser(logger: Logger): Promise<PostgresIds> {
  const lookup = async () => {
    const [uid, gid] = await Promise.all([execFileAsync("id", ["-u", "postgres"]), execFileAsync("id", ["-g", "postgres"])]);
    return { uid: Number(uid.stdout), gid: Number(gid.stdout) };
  };
  try {
    return await lookup();
  } catch {
    // not there yet
  }
  logger.info("creating the user postgres, which the embedded Postgres runs as");
  try {
    await execFileAsync("groupadd", ["--force", "--system", "postgres"]);
    await execFileAsync("useradd", ["--system", "--gid", "postgres", "--no-create-home", "postgres"]);
  } catch (err) {
    // Another process may have created it meanwhile.
    try {
      return await lookup();
    } catch {
      const why = (err as { stderr?: string }).stderr?.trim() || (err as Error).message;
      throw new EmbeddedPostgresError(
        `Postgres does not run as root, and the user postgres it would run as is missing and could not be created (${why}): create it (useradd --system postgres), or set DATABASE_URL to use an external Postgres`,
      );
    }
  }
  return lookup();
}

/**
 * Where a new cluster of `dataDir` goes: `<dataDir>/postgres` when the postgres user
 * can reach it; otherwise (the data directory lies under a directory closed to that
 * user, such as root's 0700 home) a directory under `RUNTIME_DIR/clusters` that
 * `<dataDir>/postgres` links to. The modes of the user's own directories are left as
 * they are.
 */
function newClusterDir(dataDir: string, ids: PostgresIds, logger: Logger): string {
  const link = path.join(dataDir, "postgres");
  const st = fs.lstatSync(link, { throwIfNoEntry: false });
  if (st?.isSymbolicLink()) {
    const target = path.resolve(dataDir, fs.readlinkSync(link));
    if (!fs.existsSync(target)) throw new EmbeddedPostgresError(`${link} links to ${target}, which is gone: restore it, or remove the link to start with an empty database`);
    return fs.realpathSync(link);
  }
  if (blockedAt(dataDir, ids) === undefined) return link;
  if (st) {
    // An empty directory a start that failed here left behind gives way; files do not.
    if (!st.isDirectory() || fs.readdirSync(link).length > 0)
      throw new EmbeddedPostgresError(
        `${link} holds files but no Postgres cluster, and user postgres cannot reach it there; remove it to have Stowage create the cluster elsewhere, or set DATABASE_URL to use an external Postgres`,
      );
    fs.rmdirSync(link);
  }
  const clusters = path.join(RUNTIME_DIR, "clusters");
  try {
    fs.mkdirSync(clusters, { recursive: true, mode: 0o755 });
  } catch (err) {
    throw new EmbeddedPostgresError(
      `embedded Postgres runs as user postgres, which cannot reach ${dataDir}, and ${clusters} could not be created for it (${(err as NodeJS.ErrnoException).code}): set STOWAGE_DATA_DIR to a directory that user can reach, or DATABASE_URL to use an external Postgres`,
    );
  }
  const blocked = blockedAt(clusters, ids);
  if (blocked) throw unreachable(clusters, blocked);
  const dir = fs.mkdtempSync(path.join(clusters, "cluster-"));
  try {
    fs.symlinkSync(dir, link);
  } catch (err) {
    fs.rmdirSync(dir);
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return fs.realpathSync(link); // another process was first
    throw err;
  }
  logger.info("embedded Postgres keeps its data where user postgres can reach it", { dir, link });
  return dir;
}

/** Creates the cluster of `dataDir` (initdb), owned by the user it will run as. */
async function initCluster(dataDir: string, password: string, logger: Logger): Promise<void> {
  const ids = isRoot() ? await postgresUser(logger) : undefined;
  const initdb = binary(await reachableInstall(ids, RUNTIME_DIR, logger), "initdb");
  const pgDir = ids ? newClusterDir(dataDir, ids, logger) : path.join(dataDir, "postgres");
  fs.mkdirSync(pgDir, { recursive: true, mode: 0o700 });
  if (ids) fs.chownSync(pgDir, ids.uid, ids.gid);
  // initdb reads the superuser's password from a file, written beside the cluster
  // for its user alone and removed once read.
  const pwFile = path.join(path.dirname(pgDir), `.initdb-pw-${crypto.randomBytes(6).toString("hex")}`);
  fs.writeFileSync(pwFile, password + "\n", { mode: 0o600, flag: "wx" });
  if (ids) fs.chownSync(pwFile, ids.uid, ids.gid);
  logger.info("initialising embedded Postgres", { dir: pgDir });
  try {
    const child = spawn(initdb, [`--pgdata=${pgDir}`, "--auth=password", "--username=postgres", `--pwfile=${pwFile}`, "--encoding=UTF8", "--lc-messages=C"], {
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, LC_MESSAGES: "C" },
      cwd: path.dirname(pgDir),
      ...ids,
    });
    let errors = "";
    child.stdout!.on("data", (d: Buffer) => logger.debug("initdb", { line: d.toString("utf8").trim() }));
    child.stderr!.on("data", (d: Buffer) => {
      errors += d.toString("utf8");
      logger.debug("initdb", { line: d.toString("utf8").trim() });
    });
    await new Promise<void>((resolve, reject) => {
      child.once("error", (err) => reject(spawnFailure(initdb, err, ids)));
      child.once("close", (code, signal) => {
        if (code === 0) resolve();
        else reject(new EmbeddedPostgresError(`embedded Postgres could not be initialised in ${pgDir}: ${errors.trim() || `initdb ended with ${code ?? signal}`}`));
      });
    });
  } finally {
    fs.rmSync(pwFile, { force: true });
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
        return { url: url(password, existing.port), owned: false, onRestart: () => undefined, stop: async () => undefined };
      }
    } else {
      if (!fs.existsSync(path.join(pgDir, "PG_VERSION"))) await initCluster(dataDir, password, logger);
      const port = await freePort();
      try {
        const cluster = await startCluster(dataDir, pgDir, port, password, logger);
        logger.info("embedded Postgres started", { port });
        const supervised = new SupervisedCluster(cluster, port, () => startCluster(dataDir, pgDir, port, password, logger), logger);
        return { url: url(password, port), owned: true, onRestart: (listener) => supervised.onRestart(listener), stop: () => supervised.stop() };
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
