/**
 * NBD benchmark: Stowage's NBD server against `nbdkit file` serving a raw file on the
 * same file system (the ceiling for a user-space NBD server here), with the same clients.
 *
 *   npm run bench:nbd                         # 1 GiB disk, 15 s a random workload
 *   npm run bench:nbd -- --size 256M          # a quick smaller run (or BENCH_SIZE_GIB)
 *   npm run bench:nbd -- --runs 3             # repeat every measurement 3 times; the table shows medians (RSS: the max)
 *   npm run bench:nbd -- --cpu-prof           # also profile the service and print where its CPU time goes per workload
 *   options: --duration S (seconds of each random workload, after 1 s of warm-up; default 15),
 *   --keep (keep the temp dir), --dir DIR (where the temp dir goes; default $TMPDIR), --seed N,
 *   --dist[=DIR] (run the compiled build DIR/src/main.js; default dist/, built first when missing or stale),
 *   --ts-node (run the service under ts-node instead of the compiled build), --node-args=FLAGS (node flags for the
 *   service after npm start's, e.g. --node-args=--max-semi-space-size=16)
 *
 * Needs nbdkit (Debian package nbdkit), nbdcopy (libnbd-bin) and fio with its nbd engine
 * (fio). The source image (about a third zeros never written, a third random bytes, a
 * third English-like text; deterministic, the generator of bench/backup.ts) is written
 * to a sparse src.raw in a temp dir. Stowage runs from the compiled build as `npm start`
 * runs it, on a fresh data dir in the same temp dir with its embedded Postgres and local
 * blobs, NBD on a free port, and neither the collector nor the policy scheduler running
 * (GC_INTERVAL_SECONDS=0, SCHEDULER_INTERVAL_SECONDS=0: there are no policies, and a client
 * stalled for 10 minutes fails the run). Each run makes a fresh
 * disk of --size bytes with a writable and a read-only export; nbdkit serves a fresh
 * sparse raw file of --size bytes in the same temp dir (`nbdkit file`, no filters: its
 * FLUSH is fdatasync, Stowage's a durable commit of the buffered blocks to its segments
 * and Postgres).
 *
 * Each workload runs against Stowage, then against nbdkit, each after an untimed `sync`:
 *   sequential write  `nbdcopy --flush src.raw URI` into the empty disk (holes go as zero requests)
 *   sequential read   `nbdcopy URI null:` (Stowage: the read-only export, as a reader would use; it
 *                     advertises multi-conn); then (untimed) both disks must read back src.raw by SHA-256
 *   random reads      fill the whole disk with random bytes (untimed, fio, 1 MiB writes, then a
 *                     flush), then `fio --ioengine=nbd --rw=randread --bs=4k --iodepth=16` for --duration s
 *                     (Stowage: on the read-only export)
 *   random writes     the same with --rw=randwrite --fsync=64 (fio's option for a flush every 64 writes; at
 *                     depth 16 fio sends an NBD FLUSH about every 5 writes instead, as nbdkit's stats filter
 *                     counts: 21,291 FLUSHes for 110,400 writes; at depth 1 it is every 64); then, for the
 *                     details, the same into nbdkit behind its blocksize filter with minblock=64K, so that
 *                     each 4 KiB write reads and writes a whole 64 KiB block, as a Stowage disk's does
 *   8 connections     at once: `nbdcopy --connections=1 --flush src.raw` into the writable export and
 *                     7 × `nbdcopy --connections=1 URI null:` from the read-only one (nbdkit: its one URI)
 * Throughput is the disk's size over nbdcopy's wall time (as for the issue's 1 GiB in 1.03 s);
 * IOPS are fio's. nbdcopy uses 4 connections where the server advertises multi-conn (both
 * do): the rows use nbdcopy's defaults, and the details give nbdkit with --connections=1
 * too (into a second fresh file). Peak RSS is the largest VmRSS of
 * the server's process seen during the 8-connection phase (sampled every 50 ms; Stowage's
 * node process, its Postgres runs in processes of its own); the details give the peaks
 * per phase and VmHWM over the run. CPU seconds per phase come from /proc.
 * Targets: sequential write and read ≥ 0.5× nbdkit's throughput, 4 KiB random reads
 * ≥ 0.5× its IOPS, random writes ≥ 0.25×, peak RSS with 8 connections < 300 MiB.
 * Times are wall-clock: run it on an otherwise idle machine (the report shows the load).
 */
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import fsp from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { BARE_DIST, COMMON_FLAGS, commonOptions, int, parseFlags, runBench, type CommonOptions } from "./lib/cli";
import { profileLines, type Window } from "./lib/cpuprofile";
import { layout, sha256File, writeImage, type Region } from "./lib/image";
import { cpuTree, freePort, hrSeconds, onInterrupt, procStatusKiB, requireProgram, RssSampler, run, settle } from "./lib/proc";
import { f2, fmtInt, log, maxOf, median, mib, ratioOf, table, verdict, x } from "./lib/report";
import { StowageProcess } from "./lib/stowage";
import { BLOCK_SIZE } from "../src/storage/volume-store";

interface Options extends CommonOptions {
  duration: number;
  tsNode: boolean;
  nodeArgs: string[];
}

function options(argv: string[]): Options {
  const v = parseFlags(__filename, argv, { ...COMMON_FLAGS, duration: { type: "string" }, "ts-node": { type: "boolean" }, "node-args": { type: "string" } }, BARE_DIST);
  return { ...commonOptions(v), duration: int(v.duration, "--duration", 15), tsNode: v["ts-node"] ?? false, nodeArgs: v["node-args"]?.split(/\s+/).filter(Boolean) ?? [] };
}

interface Programs {
  nbdkit: string;
  nbdcopy: string;
  fio: string;
}

type ServerName = "Stowage" | "nbdkit";

/** One server as the clients see it. */
interface Server {
  name: ServerName;
  /** Where writes go (Stowage: the writable export). */
  rw: string;
  /** Where the 8-connection phase's readers read (Stowage: the read-only export of the same disk). */
  ro: string;
  pid: number;
  sampler: RssSampler;
}

/** What one server did in one phase. */
interface Phase {
  server: ServerName;
  label: string;
  seconds: number;
  /** CPU seconds of the server's process, and of its descendants (Stowage's Postgres). */
  cpu: number;
  childCpu: number;
  peakRssKiB: number;
}

interface Fio {
  iops: number;
  /** Completion latency percentiles, µs. */
  p50: number;
  p99: number;
}

interface Numbers {
  seqWrite: number | null;
  seqRead: number | null;
  randRead: Fio | null;
  randWrite: Fio | null;
  /** Peak RSS in the 8-connection phase, KiB. */
  rss8: number | null;
  /** Seconds of the 8-connection phase. */
  eight: number | null;
  /** VmHWM of the server's process at the end of the run, KiB. */
  hwm: number | null;
}

const none = (): Numbers => ({ seqWrite: null, seqRead: null, randRead: null, randWrite: null, rss8: null, eight: null, hwm: null });

interface RunResult {
  numbers: Record<ServerName, Numbers>;
  /** nbdkit with nbdcopy --connections=1: seconds of the write and of the read. */
  single: { write: number; read: number };
  /** nbdkit's 4 KiB random writes with 64 KiB blocks (the blocksize filter): Stowage's unit of change. */
  blockRandWrite: Fio;
  phases: Phase[];
  rssByPhase: Record<ServerName, Map<string, number>>;
  loads: [number, number];
}

/** Holds what must be stopped if the benchmark is interrupted. */
const live: { svc: StowageProcess | null; nbdkit: Set<ChildProcess>; clients: Set<ChildProcess> } = { svc: null, nbdkit: new Set(), clients: new Set() };

/**
 * `nbdkit file` on `file`, listening on a free port of 127.0.0.1; resolves once it accepts connections.
 * `minBlock`: behind nbdkit's blocksize filter, which turns a smaller write into a read-modify-write of
 * whole blocks of that size.
 */
async function startNbdkit(nbdkit: string, file: string, logFile: string, minBlock?: number): Promise<{ child: ChildProcess; uri: string }> {
  const port = await freePort();
  const out = fs.openSync(logFile, "a");
  const filter = minBlock ? ["--filter=blocksize"] : [];
  const filterArgs = minBlock ? [`minblock=${minBlock}`] : [];
  const child = spawn(nbdkit, ["--exit-with-parent", "-f", "-p", String(port), "-i", "127.0.0.1", ...filter, "file", `file=${file}`, ...filterArgs], { stdio: ["ignore", out, out] });
  fs.closeSync(out);
  live.nbdkit.add(child);
  child.once("exit", () => live.nbdkit.delete(child));
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`nbdkit exited before serving: ${fs.readFileSync(logFile, "utf8").slice(-2000)}`);
    const up = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, "127.0.0.1", () => {
        s.destroy();
        resolve(true);
      });
      s.on("error", () => resolve(false));
    });
    if (up) return { child, uri: `nbd://127.0.0.1:${port}/` };
    if (Date.now() > deadline) throw new Error(`nbdkit did not listen on ${port} within 30 s`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  await exited;
}

/** A fresh sparse file of `size` bytes: what nbdkit serves. */
async function freshRaw(file: string, size: number): Promise<void> {
  await fsp.rm(file, { force: true });
  const fh = await fsp.open(file, "w", 0o644);
  await fh.truncate(size);
  await fh.close();
}

/** A client that has not ended after this long is stopped and fails the run (a stalled server, not a slow one). */
const CLIENT_TIMEOUT_MS = 10 * 60 * 1000;

/**
 * Runs a client to its end and fails on a non-zero exit or after CLIENT_TIMEOUT_MS.
 * Stowage refuses a second writable connection to a disk until the last one's
 * disconnect is done (its final commit): a client refused so, right after the one
 * before it, is started again.
 */
async function client(cmd: string, args: string[]): Promise<string> {
  for (let attempt = 1; ; attempt++) {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    live.clients.add(child);
    let stdout = "";
    let stderr = "";
    child.stdout!.on("data", (d) => (stdout = (stdout + d).slice(-100_000)));
    child.stderr!.on("data", (d) => (stderr = (stderr + d).slice(-100_000)));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill("SIGKILL");
    }, CLIENT_TIMEOUT_MS);
    const code = await new Promise<number>((resolve, reject) => {
      child.on("error", reject);
      child.on("close", (c, signal) => resolve(c ?? (signal ? 128 : 1)));
    }).finally(() => {
      clearTimeout(timer);
      live.clients.delete(child);
    });
    const what = `${path.basename(cmd)} ${args.join(" ")}`;
    if (timedOut) throw new Error(`${what} had not ended after ${CLIENT_TIMEOUT_MS / 1000} s: the server stalled\n${stderr.slice(-2000)}`);
    if (code === 0) return stdout;
    if (/already has a writable/.test(stderr) && attempt < 50) {
      await new Promise((res) => setTimeout(res, 100));
      continue;
    }
    throw new Error(`${what} exited with ${code}:\n${stderr.slice(-4000)}${stdout.slice(-2000)}`);
  }
}

/** fio with its nbd engine on `uri`; the one job's numbers (reads or writes, as `rw` does). */
async function fio(bin: string, uri: string, size: number, args: string[]): Promise<Fio> {
  const out = await client(bin, ["--name=nbd", "--ioengine=nbd", `--uri=${uri}`, `--size=${size}`, "--output-format=json", ...args]);
  const json = JSON.parse(out.slice(out.indexOf("{"))) as { jobs: FioJob[] };
  const job = json.jobs[0];
  if (job.error) throw new Error(`fio ${args.join(" ")}: error ${job.error}`);
  const side = job.write.total_ios > job.read.total_ios ? job.write : job.read;
  const pct = side.clat_ns.percentile ?? {};
  return { iops: side.iops, p50: (pct["50.000000"] ?? NaN) / 1000, p99: (pct["99.000000"] ?? NaN) / 1000 };
}

interface FioSide {
  iops: number;
  total_ios: number;
  clat_ns: { percentile?: Record<string, number> };
}
interface FioJob {
  error: number;
  read: FioSide;
  write: FioSide;
}

/** One complete measurement: a fresh Stowage disk with its exports, a fresh nbdkit file. */
async function measure(o: Options, progs: Programs, svc: StowageProcess, stowageSampler: RssSampler, src: string, sha0: string, dir: string, runNo: number, windows: Window[]): Promise<RunResult> {
  const size = o.size;
  const loadStart = os.loadavg()[0];
  if (loadStart > os.cpus().length / 2) log(`warning: load average ${loadStart.toFixed(2)} on ${os.cpus().length} CPUs: other work will skew the numbers`);
  await fsp.mkdir(dir, { recursive: true, mode: 0o755 });

  // ---- Stowage: a fresh disk, a writable and a read-only export ----------------------------
  const diskId = await svc.createDisk(`nbd-bench-${runNo}`, size);
  const exportOf = async (readOnly: boolean) => {
    const r = await svc.gql(`mutation ($r: ID!, $ro: Boolean!) { createNbdExport(input: { resourceId: $r, readOnly: $ro }) { nbdExport { id uri readOnly } } }`, { r: diskId, ro: readOnly });
    return r.createNbdExport.nbdExport.uri as string;
  };
  const stowage: Server = { name: "Stowage", rw: await exportOf(false), ro: await exportOf(true), pid: svc.pid, sampler: stowageSampler };

  // ---- nbdkit: a fresh sparse file ------------------------------------------------------------
  const raw = path.join(dir, "nbdkit.raw");
  await freshRaw(raw, size);
  const kit = await startNbdkit(progs.nbdkit, raw, path.join(dir, "nbdkit.log"));
  const nbdkit: Server = { name: "nbdkit", rw: kit.uri, ro: kit.uri, pid: kit.child.pid!, sampler: new RssSampler(kit.child.pid!) };
  log(`run ${runNo}: Stowage ${stowage.rw} (read-only ${stowage.ro}), nbdkit ${nbdkit.rw}`);

  const phases: Phase[] = [];
  const numbers: Record<ServerName, Numbers> = { Stowage: none(), nbdkit: none() };
  /** A timed phase of one server: after an untimed sync; its wall time, CPU and peak RSS. */
  const phase = async <T>(server: Server, label: string, fn: () => Promise<T>): Promise<{ seconds: number; result: T }> => {
    await settle();
    server.sampler.setPhase(label);
    const cpu0 = cpuTree(server.pid);
    const startUs = Number(process.hrtime.bigint() / 1000n);
    const t0 = hrSeconds();
    const result = await fn();
    const seconds = hrSeconds() - t0;
    const endUs = Number(process.hrtime.bigint() / 1000n);
    const cpu1 = cpuTree(server.pid);
    server.sampler.sample();
    phases.push({
      server: server.name,
      label,
      seconds,
      cpu: cpu1.self - cpu0.self,
      childCpu: cpu1.descendants - cpu0.descendants,
      peakRssKiB: server.sampler.peaks.get(label) ?? 0,
    });
    if (server.name === "Stowage") windows.push({ label: `run ${runNo}: ${label}`, startUs, endUs });
    return { seconds, result };
  };
  const both = [stowage, nbdkit];

  try {
    // ---- sequential write and read ---------------------------------------------------------
    for (const s of both) {
      const { seconds } = await phase(s, "sequential write", () => client(progs.nbdcopy, ["--flush", src, s.rw]));
      numbers[s.name].seqWrite = seconds;
      log(`${s.name} sequential write: ${seconds.toFixed(2)} s (${(mib(size) / seconds).toFixed(0)} MiB/s)`);
    }
    for (const s of both) {
      const { seconds } = await phase(s, "sequential read", () => client(progs.nbdcopy, [s.ro, "null:"]));
      numbers[s.name].seqRead = seconds;
      log(`${s.name} sequential read: ${seconds.toFixed(2)} s (${(mib(size) / seconds).toFixed(0)} MiB/s)`);
    }
    stowage.sampler.setPhase("checks (untimed)");
    const got = await svc.sha256Disk(diskId);
    if (got.sha256 !== sha0 || got.bytes !== size) throw new Error(`the Stowage disk does not read back src.raw after nbdcopy (${got.sha256} vs ${sha0})`);
    if ((await sha256File(raw)) !== sha0) throw new Error("nbdkit's file does not read back src.raw after nbdcopy");
    log("both disks read back src.raw (SHA-256)");

    // ---- nbdkit with one connection, into a second fresh file (details only) ----------------
    const raw1 = path.join(dir, "nbdkit-1conn.raw");
    await freshRaw(raw1, size);
    const kit1 = await startNbdkit(progs.nbdkit, raw1, path.join(dir, "nbdkit.log"));
    const single = { write: 0, read: 0 };
    try {
      await settle();
      let t = hrSeconds();
      await client(progs.nbdcopy, ["--connections=1", "--flush", src, kit1.uri]);
      single.write = hrSeconds() - t;
      await settle();
      t = hrSeconds();
      await client(progs.nbdcopy, ["--connections=1", kit1.uri, "null:"]);
      single.read = hrSeconds() - t;
      log(`nbdkit with nbdcopy --connections=1: write ${single.write.toFixed(2)} s, read ${single.read.toFixed(2)} s`);
    } finally {
      await stopChild(kit1.child);
      await fsp.rm(raw1, { force: true });
    }

    // ---- random I/O over a disk full of data ------------------------------------------------
    for (const s of both) {
      s.sampler.setPhase("fill for random I/O (untimed)");
      const t = hrSeconds();
      await fio(progs.fio, s.rw, size, ["--rw=write", "--bs=1M", "--iodepth=8", "--refill_buffers", "--end_fsync=1"]);
      log(`${s.name}: disk filled with random bytes for the random workloads in ${(hrSeconds() - t).toFixed(1)} s (untimed)`);
    }
    const random = ["--bs=4k", "--iodepth=16", "--time_based", `--runtime=${o.duration}`, "--ramp_time=1", "--randrepeat=1", "--norandommap"];
    for (const s of both) {
      const { result } = await phase(s, "4 KiB random reads", () => fio(progs.fio, s.ro, size, ["--rw=randread", ...random]));
      numbers[s.name].randRead = result;
      log(`${s.name} 4 KiB random reads: ${fmtInt(Math.round(result.iops))} IOPS (p50 ${result.p50.toFixed(0)} µs, p99 ${result.p99.toFixed(0)} µs)`);
    }
    for (const s of both) {
      const { result } = await phase(s, "4 KiB random writes", () => fio(progs.fio, s.rw, size, ["--rw=randwrite", "--fsync=64", ...random]));
      numbers[s.name].randWrite = result;
      log(`${s.name} 4 KiB random writes: ${fmtInt(Math.round(result.iops))} IOPS (p50 ${result.p50.toFixed(0)} µs, p99 ${result.p99.toFixed(0)} µs)`);
    }
    // ---- the same random writes into nbdkit with Stowage's unit of change (details only) ----------
    // A Stowage disk changes in whole 64 KiB blocks, so a 4 KiB write reads, hashes and stores 64 KiB;
    // nbdkit's blocksize filter makes nbdkit read and write 64 KiB per 4 KiB write too (in place).
    const blockKit = await startNbdkit(progs.nbdkit, raw, path.join(dir, "nbdkit.log"), BLOCK_SIZE);
    let blockRandWrite: Fio;
    try {
      await settle();
      blockRandWrite = await fio(progs.fio, blockKit.uri, size, ["--rw=randwrite", "--fsync=64", ...random]);
      log(`nbdkit with 64 KiB blocks 4 KiB random writes: ${fmtInt(Math.round(blockRandWrite.iops))} IOPS`);
    } finally {
      await stopChild(blockKit.child);
    }

    // ---- 8 connections at once: 1 writer, 7 readers ---------------------------------------------
    for (const s of both) {
      const label = "8 connections";
      const { seconds } = await phase(s, label, () =>
        Promise.all([client(progs.nbdcopy, ["--connections=1", "--flush", src, s.rw]), ...Array.from({ length: 7 }, () => client(progs.nbdcopy, ["--connections=1", s.ro, "null:"]))]),
      );
      numbers[s.name].eight = seconds;
      numbers[s.name].rss8 = s.sampler.peaks.get(label) ?? null;
      log(`${s.name} 8 connections: ${seconds.toFixed(2)} s, peak RSS ${((numbers[s.name].rss8 ?? 0) / 1024).toFixed(0)} MiB`);
    }
    for (const s of both) numbers[s.name].hwm = procStatusKiB(s.pid, "VmHWM");
    return { numbers, single, blockRandWrite, phases, rssByPhase: { Stowage: new Map(stowage.sampler.peaks), nbdkit: new Map(nbdkit.sampler.peaks) }, loads: [loadStart, os.loadavg()[0]] };
  } finally {
    nbdkit.sampler.stop();
    await stopChild(kit.child);
    await fsp.rm(raw, { force: true });
  }
}

function report(o: Options, runs: RunResult[], versions: string[]): string {
  const size = o.size;
  const regions = layout(size, o.seed);
  const share = (k: Region["kind"]) => regions.filter((r) => r.kind === k).reduce((n, r) => n + r.length, 0);
  const med = (s: ServerName, f: (n: Numbers) => number | null) => median(runs.map((r) => f(r.numbers[s])));
  const rate = (seconds: number | null) => (seconds === null ? null : mib(size) / seconds);
  const agg = (s: ServerName) => ({
    seqWrite: rate(med(s, (n) => n.seqWrite)),
    seqWriteS: med(s, (n) => n.seqWrite),
    seqRead: rate(med(s, (n) => n.seqRead)),
    seqReadS: med(s, (n) => n.seqRead),
    randRead: med(s, (n) => n.randRead?.iops ?? null),
    randWrite: med(s, (n) => n.randWrite?.iops ?? null),
    rss8: maxOf(runs.map((r) => r.numbers[s].rss8)),
  });
  const s = agg("Stowage");
  const k = agg("nbdkit");
  const throughput = (v: number | null, sec: number | null) => (v === null ? "n/a" : `${v.toFixed(0)} MiB/s (${f2(sec)} s)`);
  const iops = (v: number | null) => (v === null ? "n/a" : `${fmtInt(Math.round(v))} IOPS`);
  const rssMiB = (v: number | null) => (v === null ? null : v / 1024);
  const us = (v: number | null) => (v === null || !Number.isFinite(v) ? "n/a" : fmtInt(Math.round(v)));
  const row = (name: string, sv: string, kv: string, ratio: number | null, min: number) => [name, sv, kv, x(ratio), `≥ ${x(min, 2)}`, verdict(ratio === null ? null : ratio >= min)];
  const data = mib(share("random") + share("text"));
  const lines: string[] = [""];
  lines.push(
    `NBD benchmark: ${mib(size)} MiB disk (${data.toFixed(0)} MiB data: random ${mib(share("random")).toFixed(0)} MiB, text ${mib(share("text")).toFixed(0)} MiB; ` +
      `zeros ${mib(share("zero")).toFixed(0)} MiB); random workloads ${o.duration} s each at depth 16; ${os.cpus().length} CPUs, node ${process.version}` +
      (runs.length > 1 ? `; median of ${runs.length} runs (peak RSS: max)` : ""),
  );
  lines.push("");
  const rss = rssMiB(s.rss8);
  const kitRss = rssMiB(k.rss8);
  lines.push(
    ...table(
      ["workload", "Stowage", "nbdkit file", "Stowage/nbdkit", "target", ""],
      [
        row("sequential write + flush (`nbdcopy --flush`)", throughput(s.seqWrite, s.seqWriteS), throughput(k.seqWrite, k.seqWriteS), ratioOf(s.seqWrite, k.seqWrite), 0.5),
        row("sequential read (`nbdcopy URI null:`)", throughput(s.seqRead, s.seqReadS), throughput(k.seqRead, k.seqReadS), ratioOf(s.seqRead, k.seqRead), 0.5),
        row("4 KiB random reads, depth 16 (`fio`)", iops(s.randRead), iops(k.randRead), ratioOf(s.randRead, k.randRead), 0.5),
        row("4 KiB random writes, depth 16, `fio --fsync=64` (a FLUSH every ~5 writes)", iops(s.randWrite), iops(k.randWrite), ratioOf(s.randWrite, k.randWrite), 0.25),
        [
          "peak RSS, 8 connections (1 writer + 7 readers)",
          rss === null ? "n/a" : `${rss.toFixed(0)} MiB`,
          kitRss === null ? "n/a" : `${kitRss.toFixed(0)} MiB`,
          "",
          "< 300 MiB",
          verdict(rss === null ? null : rss < 300),
        ],
      ],
    ),
  );
  lines.push("");
  lines.push("Details:");
  lines.push(`- ${versions.join("; ")}`);
  const single = { write: median(runs.map((r) => r.single.write)), read: median(runs.map((r) => r.single.read)) };
  lines.push(
    `- both advertise multi-conn, so plain nbdcopy opens 4 connections to each; nbdkit with \`nbdcopy --connections=1\`: write ${throughput(rate(single.write), single.write)}, ` +
      `read ${throughput(rate(single.read), single.read)} (Stowage/that: write ${x(ratioOf(s.seqWrite, rate(single.write)))}, read ${x(ratioOf(s.seqRead, rate(single.read)))})`,
  );
  const blockWrites = median(runs.map((r) => r.blockRandWrite.iops));
  lines.push(
    `- 4 KiB random writes into nbdkit with 64 KiB blocks (\`--filter=blocksize minblock=64K\`: a read-modify-write of 64 KiB per write, Stowage's unit of change): ` +
      `${iops(blockWrites)} (Stowage/that: ${x(ratioOf(s.randWrite, blockWrites))})`,
  );
  for (const name of ["Stowage", "nbdkit"] as ServerName[]) {
    const rr = med(name, (n) => n.randRead?.p50 ?? null);
    const rr99 = med(name, (n) => n.randRead?.p99 ?? null);
    const rw = med(name, (n) => n.randWrite?.p50 ?? null);
    const rw99 = med(name, (n) => n.randWrite?.p99 ?? null);
    lines.push(`- ${name} fio completion latency (µs, p50 / p99): random reads ${us(rr)} / ${us(rr99)}, random writes ${us(rw)} / ${us(rw99)}`);
  }
  runs.forEach((run, i) => {
    const tag = runs.length > 1 ? `run ${i + 1}: ` : "";
    lines.push(`- ${tag}load average (1 min) ${run.loads[0].toFixed(2)} at the start, ${run.loads[1].toFixed(2)} at the end, on ${os.cpus().length} CPUs`);
    for (const label of [...new Set(run.phases.map((p) => p.label))]) {
      const cell = (p: Phase | undefined) =>
        !p
          ? "n/a"
          : `${p.seconds.toFixed(2)} s, CPU ${p.cpu.toFixed(2)} s${p.server === "Stowage" ? ` (+ Postgres ${p.childCpu.toFixed(2)} s)` : ""}, peak RSS ${(p.peakRssKiB / 1024).toFixed(0)} MiB`;
      const of = (name: ServerName) => run.phases.find((p) => p.label === label && p.server === name);
      lines.push(`- ${tag}${label}: Stowage ${cell(of("Stowage"))}; nbdkit ${cell(of("nbdkit"))}`);
    }
    for (const name of ["Stowage", "nbdkit"] as ServerName[]) {
      const hwm = run.numbers[name].hwm;
      lines.push(
        `- ${tag}${name} RSS peaks by phase (sampled every 50 ms): ${[...run.rssByPhase[name]].map(([p, v]) => `${p} ${(v / 1024).toFixed(0)} MiB`).join(", ")}; ` +
          `VmHWM at the end ${hwm === null ? "n/a" : `${(hwm / 1024).toFixed(0)} MiB`}`,
      );
    }
  });
  return lines.join("\n") + "\n";
}

async function main(): Promise<number> {
  const o = options(process.argv.slice(2));
  const progs: Programs = { nbdkit: requireProgram("nbdkit", "nbdkit"), nbdcopy: requireProgram("nbdcopy", "libnbd-bin"), fio: requireProgram("fio", "fio") };
  const enghelp = await run(progs.fio, ["--enghelp=nbd"]);
  if (enghelp.code !== 0 || !/uri/.test(enghelp.stdout)) throw new Error(`this fio has no nbd engine (fio --enghelp=nbd: ${(enghelp.stdout + enghelp.stderr).trim()})`);
  const versions: string[] = [];
  for (const [bin, arg] of [
    [progs.nbdkit, "--version"],
    [progs.nbdcopy, "--version"],
    [progs.fio, "--version"],
  ]) {
    versions.push((await run(bin, [arg])).stdout.trim().split("\n")[0]);
  }

  const tmp = await fsp.mkdtemp(path.join(o.dir, "stowage-bench-nbd-"));
  await fsp.chmod(tmp, 0o755);
  const cleanup = async () => {
    for (const child of [...live.clients]) child.kill("SIGKILL");
    for (const child of [...live.nbdkit]) await stopChild(child).catch(() => undefined);
    await live.svc?.stop().catch(() => undefined);
    live.svc = null;
    if (o.keep) log(`kept ${tmp}`);
    else await fsp.rm(tmp, { recursive: true, force: true });
  };
  onInterrupt(cleanup, log);

  try {
    log(`working in ${tmp}; disk ${mib(o.size)} MiB, seed ${o.seed}, ${o.runs} run(s)`);
    // ---- the source image (untimed) -------------------------------------------------------
    const src = path.join(tmp, "src.raw");
    let t = hrSeconds();
    const sha0 = await writeImage(src, o.size, layout(o.size, o.seed), o.seed);
    log(`src.raw written in ${(hrSeconds() - t).toFixed(1)} s`);

    // ---- Stowage, from the compiled build unless --ts-node ----------------------------------
    let dist: string | null = null;
    if (!o.tsNode) {
      if (o.dist) dist = o.dist;
      else {
        require("../bin/build").ensureBuilt(() => log("compiling the sources into dist/ (missing or older than the sources)"));
        dist = path.join(__dirname, "..", "dist");
      }
    }
    const profDir = path.join(tmp, "prof");
    t = hrSeconds();
    const svc = await StowageProcess.start(path.join(tmp, "stowage"), {
      dist,
      nodeArgs: [...o.nodeArgs, ...(o.cpuProf ? ["--cpu-prof", `--cpu-prof-dir=${profDir}`] : [])],
      env: { NBD_PORT: String(await freePort()), GC_INTERVAL_SECONDS: "0", SCHEDULER_INTERVAL_SECONDS: "0" },
    });
    live.svc = svc;
    log(`Stowage ${dist ? "(compiled build)" : "(ts-node)"} at ${svc.url} (pid ${svc.pid}), started in ${(hrSeconds() - t).toFixed(1)} s`);
    const sampler = new RssSampler(svc.pid);
    const windows: Window[] = [];
    const runs: RunResult[] = [];
    try {
      for (let i = 1; i <= o.runs; i++) {
        const dir = path.join(tmp, `run${i}`);
        runs.push(await measure(o, progs, svc, sampler, src, sha0, dir, i, windows));
        if (!o.keep) await fsp.rm(dir, { recursive: true, force: true });
      }
    } finally {
      sampler.stop();
    }
    const out = [report(o, runs, versions)];
    if (o.cpuProf) {
      // The profile is written when the service exits.
      await svc.stop();
      live.svc = null;
      const prof = (await fsp.readdir(profDir).catch(() => [] as string[])).find((f) => f.endsWith(".cpuprofile"));
      if (!prof) log("no .cpuprofile was written (did the service exit cleanly?)");
      else out.push(profileLines("CPU profile of the service, by phase:", path.join(profDir, prof), windows).join("\n") + "\n");
    }
    process.stdout.write(out.join(""));
    return 0;
  } finally {
    await cleanup();
  }
}

runBench(main);
