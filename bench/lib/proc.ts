import { spawn } from "node:child_process";
import fs from "node:fs";
import fsp from "node:fs/promises";
import net from "node:net";
import path from "node:path";

/** The path of `program` on PATH (or itself when absolute and executable), else null. */
export function which(program: string): string | null {
  const candidates = program.includes("/") ? [program] : (process.env.PATH ?? "/usr/local/bin:/usr/bin:/bin").split(":").map((d) => path.join(d, program));
  for (const c of candidates) {
    try {
      fs.accessSync(c, fs.constants.X_OK);
      if (fs.statSync(c).isFile()) return c;
    } catch {
      /* next */
    }
  }
  return null;
}

/** Fails with a message naming the Debian package when a program is missing. */
export function requireProgram(program: string, pkg: string): string {
  const found = which(program);
  if (!found) throw new Error(`${program} is not installed: install the Debian package "${pkg}" (apt-get install ${pkg})`);
  return found;
}

export const hrSeconds = () => Number(process.hrtime.bigint()) / 1e9;

export interface TimedRun {
  seconds: number;
  maxRssKiB: number;
  stdout: string;
  stderr: string;
}

/** Runs a command under `/usr/bin/time -f %M` and returns its wall time and peak RSS. */
export async function timed(time: string, cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string; tmp: string }): Promise<TimedRun> {
  const out = path.join(opts.tmp, `time-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2)}.txt`);
  const start = hrSeconds();
  const { code, stdout, stderr } = await run(time, ["-f", "%M", "-o", out, cmd, ...args], { env: opts.env, cwd: opts.cwd });
  const seconds = hrSeconds() - start;
  const report = await fsp.readFile(out, "utf8").catch(() => "");
  await fsp.rm(out, { force: true });
  if (code !== 0) throw new Error(`${path.basename(cmd)} ${args.join(" ")} exited with ${code}:\n${stderr.slice(-4000)}${stdout.slice(-2000)}`);
  const lines = report.trim().split("\n");
  const maxRssKiB = Number(lines[lines.length - 1]);
  if (!Number.isFinite(maxRssKiB)) throw new Error(`could not read the peak RSS from /usr/bin/time: ${JSON.stringify(report)}`);
  return { seconds, maxRssKiB, stdout, stderr };
}

export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d) => (stdout = (stdout + d).slice(-100_000)));
    child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-100_000)));
    child.on("error", reject);
    child.on("close", (code, signal) => resolve({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
}

/** Field of /proc/<pid>/status in KiB (VmRSS, VmHWM), or null when the process is gone. */
export function procStatusKiB(pid: number, field: string): number | null {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

const CLK_TCK = 100;

interface ProcStat {
  pid: number;
  ppid: number;
  comm: string;
  /** utime + stime, seconds. */
  cpu: number;
  /** cutime + cstime (reaped children), seconds. */
  childCpu: number;
}

function readStat(pid: number): ProcStat | null {
  try {
    const s = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    const close = s.lastIndexOf(")");
    const comm = s.slice(s.indexOf("(") + 1, close);
    const f = s.slice(close + 2).split(" ");
    // f[0] = state (field 3); utime is field 14 -> f[11]
    return { pid, ppid: Number(f[1]), comm, cpu: (Number(f[11]) + Number(f[12])) / CLK_TCK, childCpu: (Number(f[13]) + Number(f[14])) / CLK_TCK };
  } catch {
    return null;
  }
}

/**
 * CPU seconds used so far by `pid` itself and by all its live descendants (with
 * what their own exited children used): for the service, node vs Postgres.
 */
export function cpuTree(pid: number): { self: number; descendants: number } {
  const all: ProcStat[] = [];
  for (const name of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const st = readStat(Number(name));
    if (st) all.push(st);
  }
  const children = new Map<number, ProcStat[]>();
  for (const p of all) children.set(p.ppid, [...(children.get(p.ppid) ?? []), p]);
  const root = all.find((p) => p.pid === pid);
  let descendants = 0;
  const walk = (p: number) => {
    for (const c of children.get(p) ?? []) {
      descendants += c.cpu + c.childCpu;
      walk(c.pid);
    }
  };
  walk(pid);
  return { self: root?.cpu ?? 0, descendants };
}

/** Samples a process's VmRSS every `ms`, keeping the peak per labelled phase. */
export class RssSampler {
  private timer: NodeJS.Timeout;
  private phase = "start";
  readonly peaks = new Map<string, number>();

  constructor(
    private readonly pid: number,
    ms = 50,
  ) {
    this.timer = setInterval(() => this.sample(), ms);
    this.timer.unref();
  }

  setPhase(phase: string): void {
    this.sample();
    this.phase = phase;
    this.sample();
  }

  sample(): void {
    const kib = procStatusKiB(this.pid, "VmRSS");
    if (kib !== null) this.peaks.set(this.phase, Math.max(this.peaks.get(this.phase) ?? 0, kib));
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

/** On Ctrl-C or SIGTERM: clean up once and exit 130; a second signal exits at once. */
export function onInterrupt(cleanup: () => Promise<void>, log: (msg: string) => void): void {
  let interrupted = false;
  const handler = () => {
    if (interrupted) process.exit(130);
    interrupted = true;
    log("interrupted: cleaning up");
    void cleanup().finally(() => process.exit(130));
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
}

/**
 * Bytes the block device holding `dir` has written so far (/proc/diskstats), or
 * null where that cannot be told (no /proc, a file system on no block device).
 * Over a phase, it shows how fast the device took the writes: a host that
 * throttles its guests' writes shows up here, not in the CPU times.
 */
export function deviceBytesWritten(dir: string): number | null {
  try {
    const dev = fs.statSync(dir).dev;
    const major = Math.floor(dev / 256) & 0xfff;
    const minor = (dev & 0xff) | (Math.floor(dev / 4096) & ~0xff);
    if (major === 0) return null;
    const name = path.basename(fs.readlinkSync(`/sys/dev/block/${major}:${minor}`));
    for (const line of fs.readFileSync("/proc/diskstats", "utf8").split("\n")) {
      const f = line.trim().split(/\s+/);
      if (f[2] === name) return Number(f[9]) * 512; // sectors written, always of 512 bytes
    }
    return null;
  } catch {
    return null;
  }
}

/** Waits for the writeback of what came before (untimed), so a timed phase does not pay for it. */
export async function settle(): Promise<void> {
  const r = await run("sync", []);
  if (r.code !== 0) throw new Error(`sync failed: ${r.stderr}`);
}

/**
 * Runs commands one after the other, each under `/usr/bin/time`: a peer's work
 * end to end (e.g. convert, hash the result, make it durable). Seconds from the
 * first's start to the last's end, each step's, and the largest peak RSS.
 */
export async function timedSteps(
  time: string,
  steps: [cmd: string, args: string[]][],
  opts: { env?: NodeJS.ProcessEnv; cwd?: string; tmp: string },
): Promise<{ seconds: number; steps: number[]; maxRssKiB: number; stdout: string[] }> {
  const start = hrSeconds();
  const each: TimedRun[] = [];
  for (const [cmd, args] of steps) each.push(await timed(time, cmd, args, opts));
  return { seconds: hrSeconds() - start, steps: each.map((r) => r.seconds), maxRssKiB: Math.max(...each.map((r) => r.maxRssKiB)), stdout: each.map((r) => r.stdout) };
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}
