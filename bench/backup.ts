/**
 * Backup benchmark: Stowage against restic and borg on the same bytes.
 *
 *   npm run bench:backup                      # 1 GiB image, Stowage + restic + borg
 *   npm run bench:backup -- --size 4G         # 4 GiB (or BENCH_SIZE_GIB=4)
 *   npm run bench:backup -- --memory          # Stowage only, at 1 GiB and at 4 GiB (--memory=8G: another size):
 *                                             # peak RSS of the backup and the restore, side by side
 *                                             # (with --runs N: the median of the runs' peaks, and their range)
 *   npm run bench:backup -- --skip-peers      # Stowage only
 *   npm run bench:backup -- --runs 3          # repeat everything 3 times; the table shows medians (RSS: the max)
 *   npm run bench:backup -- --cpu-prof        # also profile the service and print where its CPU time goes per phase
 *   options: --keep (keep the temp dir), --dir DIR (where the temp dir goes; default $TMPDIR), --seed N,
 *   --service-node-args "ARGS" (extra node flags for the service, e.g. "--trace-gc"),
 *   --dist[=DIR] (run the compiled build DIR/src/main.js, default dist/ from `npm run build`, instead of ts-node)
 *
 * Needs restic, borg (Debian packages restic, borgbackup) and /usr/bin/time (package time)
 * unless --skip-peers. The image (about a third zeros never written, a third random
 * bytes, a third English-like text) is generated deterministically in a temp dir;
 * each tool backs it up, backs it up again after 1% of it changed in scattered
 * 64 KiB writes, and restores it; every restore is checked by SHA-256 (not timed).
 * Stowage runs as `node bin/stowage.js serve` on a fresh data dir with its embedded
 * Postgres and local blobs; its times run from the mutation to the job's finishedAt
 * (the instant it turned SUCCEEDED; jobs are polled every 250 ms, not to load the service).
 * Every timed phase, of every tool, starts after a `sync` (untimed), so none pays for the
 * writeback of the one before it. Times are wall-clock: run it on an otherwise idle
 * machine (the report shows the load). After Stowage's restore, dd writes the same
 * number of bytes durably (direct I/O, fsync every 64 MiB): the device's floor for a
 * restore that is durable when it ends, which the report sets beside the restore.
 * Speed targets, printed as rows with PASS or MISS: the first backup at most 0.5x
 * `restic backup`; the restore (durable when it ends) at most 0.5x `restic restore`
 * followed by `sync` of its file; the incremental at most 0.1x restic's with growth at
 * most 2x the changed bytes; peak RSS under 300 MiB.
 */
import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { profileLines, type Window } from "./lib/cpuprofile";
import { BARE_DIST, COMMON_FLAGS, commonOptions, parseFlags, parseSize, runBench, type CommonOptions } from "./lib/cli";
import { applyChanges, BLOCK, changes, dirBytes, GiB, layout, MiB, sha256File, writeImage, type Region } from "./lib/image";
import { deviceBytesWritten, hrSeconds, onInterrupt, procStatusKiB, requireProgram, RssSampler, run, settle, timed } from "./lib/proc";
import { f2, log, maxOf, median, mib, ratioOf, table, targetTable, verdict, x } from "./lib/report";
import { StowageProcess, timeJob, type JobTiming } from "./lib/stowage";

interface Options extends CommonOptions {
  skipPeers: boolean;
  serviceNodeArgs: string[];
  /** Compare peak RSS at 1 GiB and at this size (Stowage only), instead of the peers table. */
  memory: number | null;
}

function options(argv: string[]): Options {
  const v = parseFlags(__filename, argv, { ...COMMON_FLAGS, "skip-peers": { type: "boolean" }, "service-node-args": { type: "string" }, memory: { type: "string" } }, { ...BARE_DIST, memory: "4G" });
  return {
    ...commonOptions(v),
    skipPeers: v["skip-peers"] ?? false,
    serviceNodeArgs: (v["service-node-args"] ?? "").split(/\s+/).filter(Boolean),
    memory: v.memory === undefined ? null : parseSize(v.memory, "--memory"),
  };
}

type Tool = "stowage" | "restic" | "borg";
const TOOLS: Tool[] = ["stowage", "restic", "borg"];

interface ToolResult {
  first: number | null;
  incremental: number | null;
  /** Repository bytes added by the incremental. */
  growth: number | null;
  restore: number | null;
  /** The restore until its file is on disk: Stowage's restore is; a peer's is followed by `sync FILE` (fsync). */
  restoreDurable: number | null;
  peakRssKiB: number | null;
}

const empty = (): ToolResult => ({ first: null, incremental: null, growth: null, restore: null, restoreDurable: null, peakRssKiB: null });

interface StowagePhase extends JobTiming {
  label: string;
  bytesTotal: number;
  peakRssKiB: number;
  /** Bytes the device under the data directory wrote during the phase (null where unknown). */
  deviceWrote: number | null;
}

/**
 * A restore whose writes ran at less than this share of dd's durable rate in the
 * same run was held back by something other than the device (so was one whose
 * staging memory was misaligned: direct writes crawled at a third of the speed).
 */
const SLOW_RESTORE_SHARE = 0.5;

/** The floor is written in files of this size, each made durable before the next: what a restore's segments are. */
const FLOOR_FILE_BYTES = 64 * MiB;

/**
 * Seconds the device takes to write `bytes` durably, measured with dd: direct I/O
 * in 4 MiB writes, one file of FLOOR_FILE_BYTES at a time, each fsynced. A restore
 * that makes its bytes durable before it reports success cannot beat this by much
 * (it overlaps a segment's fsync with the next one's writes; dd does not).
 */
async function durableWriteFloor(dir: string, bytes: number): Promise<number> {
  const files: string[] = [];
  const start = hrSeconds();
  for (let at = 0, k = 0; at < bytes; at += FLOOR_FILE_BYTES, k++) {
    const file = path.join(dir, `floor-${k}`);
    files.push(file);
    const blocks = Math.ceil(Math.min(FLOOR_FILE_BYTES, bytes - at) / (4 * MiB));
    const r = await run("dd", ["if=/dev/zero", `of=${file}`, "bs=4M", `count=${blocks}`, "oflag=direct", "conv=fsync", "status=none"]);
    if (r.code !== 0) throw new Error(`dd failed: ${r.stderr}`);
  }
  const seconds = hrSeconds() - start;
  for (const f of files) await fsp.rm(f, { force: true });
  return seconds;
}

interface RunResult {
  results: Record<Tool, ToolResult>;
  phases: StowagePhase[];
  rssByPhase: Map<string, number>;
  notes: string[];
  repoAfterFirst: Record<Tool, number>;
  changedBytes: number;
  changeCount: number;
  loads: [number, number];
  windows: Window[];
  profile: string | null;
  /** Seconds for the device to write the restore's bytes durably (durableWriteFloor). */
  floor: number | null;
}

/** Contiguous runs of non-zero regions, in order: what gets written to the Stowage disk. */
function writtenExtents(regions: Region[]): { start: number; length: number }[] {
  const out: { start: number; length: number }[] = [];
  for (const r of regions) {
    if (r.kind === "zero") continue;
    const last = out[out.length - 1];
    if (last && last.start + last.length === r.start) last.length += r.length;
    else out.push({ start: r.start, length: r.length });
  }
  return out;
}

interface Programs {
  time: string;
  restic: string;
  borg: string;
}

/** Holds what must be stopped if the benchmark is interrupted. */
const live: { svc: StowageProcess | null } = { svc: null };

/** One complete measurement: a fresh image, a fresh Stowage and fresh repositories. */
async function measure(opts: Options, progs: Programs | null, dir: string, runNo: number): Promise<RunResult> {
  const size = opts.size;
  const loadStart = os.loadavg()[0];
  if (loadStart > os.cpus().length / 2) log(`warning: load average ${loadStart.toFixed(2)} on ${os.cpus().length} CPUs: other work will skew the times`);
  await fsp.mkdir(dir, { recursive: true, mode: 0o755 });
  await fsp.chmod(dir, 0o755);
  const imgDir = path.join(dir, "img");
  await fsp.mkdir(imgDir, { recursive: true });
  const image = path.join(imgDir, "disk.img");
  const notes: string[] = [];
  const results: Record<Tool, ToolResult> = { stowage: empty(), restic: empty(), borg: empty() };

  // ---- the image (untimed) --------------------------------------------------------------
  const regions = layout(size, opts.seed);
  let t = hrSeconds();
  const sha0 = await writeImage(image, size, regions, opts.seed);
  log(`run ${runNo}: image written in ${(hrSeconds() - t).toFixed(1)} s`);

  // ---- Stowage: start, fill the disk (untimed) -----------------------------------------
  const stowageDir = path.join(dir, "stowage");
  const profDir = path.join(dir, "prof");
  const svc = await StowageProcess.start(stowageDir, {
    nodeArgs: [...opts.serviceNodeArgs, ...(opts.cpuProf ? ["--cpu-prof", `--cpu-prof-dir=${profDir}`] : [])],
    env: { GC_INTERVAL_SECONDS: "0" },
    dist: opts.dist,
  });
  live.svc = svc;
  const sampler = new RssSampler(svc.pid);
  try {
    log(`Stowage serving at ${svc.url} (pid ${svc.pid})`);
    const vaultDir = path.join(stowageDir, "blobs", "vault");

    sampler.setPhase("fill (PUT)");
    const diskId = await svc.createDisk("bench", size);
    t = hrSeconds();
    for (const e of writtenExtents(regions)) {
      await svc.put(diskId, e.start, e.length, fs.createReadStream(image, { start: e.start, end: e.start + e.length - 1, highWaterMark: MiB }));
    }
    log(`Stowage disk filled in ${(hrSeconds() - t).toFixed(1)} s (untimed)`);
    sampler.setPhase("check fill (GET)");
    const filled = await svc.sha256Disk(diskId);
    if (filled.sha256 !== sha0 || filled.bytes !== size) throw new Error(`the Stowage disk does not read back the image after the PUTs (${filled.sha256} vs ${sha0})`);

    // ---- peers: repositories (untimed) ----------------------------------------------
    const resticRepo = path.join(dir, "restic-repo");
    const borgRepo = path.join(dir, "borg-repo");
    const resticEnv: NodeJS.ProcessEnv = { ...process.env, RESTIC_REPOSITORY: resticRepo, RESTIC_PASSWORD: "bench", RESTIC_CACHE_DIR: path.join(dir, "restic-cache") };
    const borgEnv: NodeJS.ProcessEnv = {
      ...process.env,
      BORG_REPO: borgRepo,
      BORG_BASE_DIR: path.join(dir, "borg-home"),
      BORG_PASSPHRASE: "",
      BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: "yes",
      BORG_RELOCATED_REPO_ACCESS_IS_OK: "yes",
      BORG_DISPLAY_PASSPHRASE: "no",
    };
    // Before every timed phase, of any tool, the writeback of what the phases before it
    // wrote finishes (untimed: settle), so no tool pays for the one before it.
    const peer = async (tool: "restic" | "borg", args: string[], cwd?: string) => {
      await settle();
      const r = await timed(progs!.time, progs![tool], args, { env: tool === "restic" ? resticEnv : borgEnv, cwd, tmp: dir });
      results[tool].peakRssKiB = Math.max(results[tool].peakRssKiB ?? 0, r.maxRssKiB);
      return r.seconds;
    };
    /** Seconds for `sync FILE` (fsync) to make a peer's restored file durable. */
    const synced = async (file: string) => (await timed(progs!.time, "sync", [file], { tmp: dir })).seconds;
    if (progs) {
      for (const [cmd, args, env] of [
        [progs.restic, ["init", "-q"], resticEnv],
        [progs.borg, ["init", "--encryption=none"], borgEnv],
      ] as const) {
        const r = await run(cmd, [...args], { env });
        if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed:\n${r.stderr}`);
      }
      const cfg = await run(progs.restic, ["cat", "config"], { env: resticEnv });
      const version = /"version":\s*(\d+)/.exec(cfg.stdout)?.[1];
      notes.push(`restic ${version === "2" ? "repository version 2, compression auto" : `repository version ${version ?? "?"} (no compression)`}; borg --encryption=none, default compression lz4`);
    }

    // Each Stowage phase: wall time, CPU of node vs its Postgres, peak RSS.
    const windows: Window[] = [];
    const phases: StowagePhase[] = [];
    const stowagePhase = async (label: string, mutation: () => Promise<{ jobId: string; result: string }>) => {
      await settle();
      sampler.setPhase(label);
      const wrote0 = deviceBytesWritten(dir);
      const { timing, result } = await timeJob(svc, label, mutation);
      const wrote1 = deviceBytesWritten(dir);
      sampler.sample();
      windows.push(timing.window);
      phases.push({
        ...timing,
        label,
        bytesTotal: timing.job.bytesTotal,
        peakRssKiB: sampler.peaks.get(label) ?? 0,
        deviceWrote: wrote0 === null || wrote1 === null ? null : wrote1 - wrote0,
      });
      return { seconds: timing.seconds, result, bytesTotal: timing.job.bytesTotal };
    };
    const backupMutation = async () => {
      const r = await svc.gql(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: diskId });
      return { jobId: r.createBackup.job.id as string, result: r.createBackup.backup.id as string };
    };
    const backupInfo = async (id: string) =>
      (await svc.gql(`query ($id: ID!) { node(id: $id) { ... on Backup { sizeBytes storedBytes status } } }`, { id })).node as { sizeBytes: number; storedBytes: number };

    // ---- first backups ---------------------------------------------------------------
    const first = await stowagePhase("first backup", backupMutation);
    results.stowage.first = first.seconds;
    const b1 = await backupInfo(first.result);
    notes.push(`Stowage first backup: sizeBytes ${mib(b1.sizeBytes).toFixed(1)} MiB, storedBytes ${mib(b1.storedBytes).toFixed(1)} MiB`);
    if (progs) {
      results.restic.first = await peer("restic", ["backup", "-q", "--host", "bench", image]);
      log(`restic first backup: ${results.restic.first.toFixed(2)} s`);
      results.borg.first = await peer("borg", ["create", "::first", "disk.img"], imgDir);
      log(`borg first backup: ${results.borg.first.toFixed(2)} s`);
    }
    const before: Record<Tool, number> = { stowage: await dirBytes(vaultDir), restic: await dirBytes(resticRepo), borg: await dirBytes(borgRepo) };

    // ---- 1% scattered changes (untimed) ----------------------------------------------
    sampler.setPhase("apply changes (PUT)");
    const changeList = changes(size, 0.01, opts.seed + 1);
    const changedBytes = changeList.length * BLOCK;
    for (const c of changeList) await svc.put(diskId, c.offset, c.data.length, c.data);
    await applyChanges(image, changeList);
    const sha1 = await sha256File(image);
    log(`changed ${changeList.length} blocks of 64 KiB (${mib(changedBytes).toFixed(2)} MiB)`);

    // ---- incremental backups --------------------------------------------------------
    const second = await stowagePhase("incremental backup", backupMutation);
    results.stowage.incremental = second.seconds;
    const b2 = await backupInfo(second.result);
    notes.push(`Stowage incremental: sizeBytes ${mib(b2.sizeBytes).toFixed(1)} MiB, storedBytes ${mib(b2.storedBytes).toFixed(2)} MiB`);
    if (progs) {
      results.restic.incremental = await peer("restic", ["backup", "-q", "--host", "bench", image]);
      log(`restic incremental: ${results.restic.incremental.toFixed(2)} s`);
      results.borg.incremental = await peer("borg", ["create", "::second", "disk.img"], imgDir);
      log(`borg incremental: ${results.borg.incremental.toFixed(2)} s`);
    }
    const after: Record<Tool, number> = { stowage: await dirBytes(vaultDir), restic: await dirBytes(resticRepo), borg: await dirBytes(borgRepo) };
    for (const tool of TOOLS) if (tool === "stowage" || progs) results[tool].growth = after[tool] - before[tool];

    // ---- full restores, each checked (the check is not timed) ---------------------------
    const restored = await stowagePhase("full restore", async () => {
      // Hydrated: every block copied into the new disk's own storage, the work restic's restore does.
      const r = await svc.gql(`mutation ($b: ID!) { createDisk(input: { name: "restored", backupId: $b, hydrate: true }) { disk { id } job { id } } }`, { b: second.result });
      return { jobId: r.createDisk.job.id as string, result: r.createDisk.disk.id as string };
    });
    results.stowage.restore = restored.seconds;
    results.stowage.restoreDurable = restored.seconds; // a restore ends once every segment is fsynced
    sampler.setPhase("check restore (GET)");
    const got = await svc.sha256Disk(restored.result);
    if (got.sha256 !== sha1 || got.bytes !== size) throw new Error(`Stowage restore differs from the image: sha256 ${got.sha256} (${got.bytes} bytes) vs ${sha1}`);
    log("Stowage restore verified");
    // The memory comparison has no use for the floor (at 4 GiB, another 2.7 GiB written).
    let floor: number | null = null;
    if (!opts.memory) {
      await settle();
      floor = await durableWriteFloor(dir, restored.bytesTotal);
      log(`the device writes the restore's ${mib(restored.bytesTotal).toFixed(0)} MiB durably in ${floor.toFixed(2)} s (dd)`);
    }
    if (progs) {
      const rDir = path.join(dir, "restic-restore");
      results.restic.restore = await peer("restic", ["restore", "latest", "-q", "--target", rDir]);
      results.restic.restoreDurable = results.restic.restore + (await synced(path.join(rDir, image)));
      if ((await sha256File(path.join(rDir, image))) !== sha1) throw new Error("restic restore differs from the image");
      await fsp.rm(rDir, { recursive: true, force: true });
      log(`restic restore: ${results.restic.restore.toFixed(2)} s (verified)`);
      const bDir = path.join(dir, "borg-restore");
      await fsp.mkdir(bDir);
      results.borg.restore = await peer("borg", ["extract", "::second"], bDir);
      results.borg.restoreDurable = results.borg.restore + (await synced(path.join(bDir, "disk.img")));
      if ((await sha256File(path.join(bDir, "disk.img"))) !== sha1) throw new Error("borg extract differs from the image");
      await fsp.rm(bDir, { recursive: true, force: true });
      log(`borg restore: ${results.borg.restore.toFixed(2)} s (verified)`);
    }

    // Phase windows (CLOCK_MONOTONIC µs, the clock of node --cpu-prof) for later analysis with --keep.
    await fsp.writeFile(path.join(dir, "phases.json"), JSON.stringify({ windows, phases }, null, 2));

    // ---- peak RSS of the service process (VmHWM: the whole run, fill and checks included) ---
    results.stowage.peakRssKiB = procStatusKiB(svc.pid, "VmHWM");
    sampler.stop();
    await svc.stop();
    live.svc = null;

    let profile: string | null = null;
    if (opts.cpuProf) {
      const prof = (await fsp.readdir(profDir).catch(() => [] as string[])).find((f) => f.endsWith(".cpuprofile"));
      if (!prof) log("no .cpuprofile was written (did the service exit cleanly?)");
      else {
        profile = path.join(opts.dir, `stowage-bench-${Date.now()}-run${runNo}.cpuprofile`);
        await fsp.copyFile(path.join(profDir, prof), profile);
      }
    }
    return {
      results,
      phases,
      rssByPhase: new Map(sampler.peaks),
      notes,
      repoAfterFirst: before,
      changedBytes,
      changeCount: changeList.length,
      loads: [loadStart, os.loadavg()[0]],
      windows,
      profile,
      floor,
    };
  } finally {
    sampler.stop();
    if (live.svc) await live.svc.stop().catch(() => undefined);
    live.svc = null;
  }
}

function report(opts: Options, runs: RunResult[]): string {
  const size = opts.size;
  const regions = layout(size, opts.seed);
  const share = (k: Region["kind"]) => regions.filter((r) => r.kind === k).reduce((n, r) => n + r.length, 0);
  const changed = runs[0].changedBytes;
  const agg: Record<Tool, ToolResult> = { stowage: empty(), restic: empty(), borg: empty() };
  for (const tool of TOOLS) {
    const of = (k: keyof ToolResult) => runs.map((r) => r.results[tool][k]);
    agg[tool] = {
      first: median(of("first")),
      incremental: median(of("incremental")),
      growth: median(of("growth")),
      restore: median(of("restore")),
      restoreDurable: median(of("restoreDurable")),
      peakRssKiB: maxOf(of("peakRssKiB")),
    };
  }
  const s = agg.stowage;
  const r = agg.restic;
  const b = agg.borg;
  const growthCell = (g: number | null) => (g === null ? "n/a" : `${mib(g).toFixed(2)} (${(g / changed).toFixed(2)}×)`);
  const rssMiB = (k: number | null) => (k === null ? null : k / 1024);
  const rows: [string, number | null, number | null, number | null, (v: number | null) => string][] = [
    ["first backup (s)", s.first, r.first, b.first, f2],
    ["incremental (s)", s.incremental, r.incremental, b.incremental, f2],
    ["incremental vault growth (MiB, × changed bytes)", s.growth, r.growth, b.growth, growthCell],
    ["full restore (s)", s.restore, r.restore, b.restore, f2],
    ["full restore until durable: peers then `sync FILE` (s)", s.restoreDurable, r.restoreDurable, b.restoreDurable, f2],
    ["peak RSS (MiB)", rssMiB(s.peakRssKiB), rssMiB(r.peakRssKiB), rssMiB(b.peakRssKiB), (v) => (v === null ? "n/a" : v.toFixed(0))],
  ];
  const lines: string[] = [""];
  lines.push(
    `Backup benchmark: ${mib(size)} MiB image (zeros ${mib(share("zero")).toFixed(0)} MiB, random ${mib(share("random")).toFixed(0)} MiB, text ${mib(share("text")).toFixed(0)} MiB), ` +
      `${runs[0].changeCount}×64 KiB changed (${mib(changed).toFixed(2)} MiB); ${os.cpus().length} CPUs, node ${process.version}` +
      (runs.length > 1 ? `; median of ${runs.length} runs (peak RSS: max)` : ""),
  );
  lines.push("");
  lines.push(
    ...table(
      ["", "Stowage", "restic", "borg", "Stowage/restic", "Stowage/borg"],
      rows.map(([name, sv, rv, bv, fmt]) => [name, fmt(sv), fmt(rv), fmt(bv), x(ratioOf(sv, rv)), x(ratioOf(sv, bv))]),
    ),
  );
  lines.push("");
  lines.push(
    ...targetTable([
      { name: "first backup", stowage: s.first, peerName: "`restic backup`", peer: r.first, max: 0.5 },
      { name: "full restore, durable when it ends", stowage: s.restore, peerName: "`restic restore`, then `sync FILE`", peer: r.restoreDurable, max: 0.5 },
    ]),
  );
  lines.push("");
  const incrRatio = ratioOf(s.incremental, r.incremental);
  const growthRatio = s.growth === null ? null : s.growth / changed;
  const restoreRatio = ratioOf(s.restore, r.restoreDurable);
  const rss = rssMiB(s.peakRssKiB);
  lines.push(
    `- ${verdict(incrRatio === null || growthRatio === null ? null : incrRatio <= 0.1 && growthRatio <= 2)} incremental ≤ 0.1× restic time (${x(incrRatio, 3)}) with growth ≤ 2× changed bytes (${x(growthRatio)})`,
  );
  const floor = median(runs.map((run) => run.floor));
  const floorRatio = ratioOf(floor, r.restoreDurable);
  if (restoreRatio !== null && restoreRatio > 0.5 && floorRatio !== null && floorRatio > 0.5)
    lines.push(`- info the restore target is out of reach in this run: writing the restored bytes durably takes the device ${x(floorRatio)} restic's restore and sync (below)`);
  lines.push(
    `- info full restore: ${x(ratioOf(s.restore, floor))} the device's time to write the same bytes durably (${f2(floor)} s: dd, direct I/O, fsync every 64 MiB), which bounds any restore that is durable when it ends`,
  );
  lines.push(`- info full restore: ${x(ratioOf(s.restore, r.restore))} restic's restore alone, which ends before its file is durable (not a target)`);
  lines.push(`- ${verdict(rss === null ? null : rss < 300)} Stowage peak RSS < 300 MiB (${rss === null ? "n/a" : rss.toFixed(0) + " MiB"})`);
  lines.push("");
  lines.push("Details:");
  lines.push(`- every restore verified by SHA-256 against the image; verification not timed`);
  lines.push(
    `- growth = bytes of the files under the vault dir (blobs/vault), the restic repo, the borg repo, after minus before the incremental; Stowage's chunk index lives in Postgres and is not counted`,
  );
  lines.push(
    `- peak RSS: Stowage = VmHWM of the node service process over the whole run (fill and checks included; Postgres runs in its own processes); restic/borg = /usr/bin/time %M, max over their runs`,
  );
  runs.forEach((run, i) => {
    const tag = runs.length > 1 ? `run ${i + 1}: ` : "";
    lines.push(
      `- ${tag}load average (1 min) ${run.loads[0].toFixed(2)} at the start, ${run.loads[1].toFixed(2)} at the end, on ${os.cpus().length} CPUs (times are only comparable on an otherwise idle machine)`,
    );
    if (runs.length > 1) {
      const cell = (t: Tool) => `${f2(run.results[t].first)} / ${f2(run.results[t].incremental)} / ${f2(run.results[t].restore)} / ${f2(run.results[t].restoreDurable)}`;
      lines.push(
        `- ${tag}first / incremental / restore / restore until durable (s): Stowage ${cell("stowage")}; restic ${cell("restic")}; borg ${cell("borg")}; the device's durable write of the restored bytes ${f2(run.floor)}`,
      );
    }
    for (const p of run.phases) {
      lines.push(
        `- ${tag}Stowage ${p.label}: ${p.seconds.toFixed(2)} s = mutation ${p.mutationMs.toFixed(0)} ms, job created→started ${p.queuedMs.toFixed(0)} ms, ran ${p.runMs.toFixed(0)} ms ` +
          `(${mib(p.bytesTotal).toFixed(1)} MiB of work); CPU: node ${p.nodeCpu.toFixed(2)} s, Postgres ${p.pgCpu.toFixed(2)} s; node peak RSS ${(p.peakRssKiB / 1024).toFixed(0)} MiB` +
          (p.deviceWrote === null ? "" : `; the device wrote ${mib(p.deviceWrote).toFixed(0)} MiB (${(mib(p.deviceWrote) / p.seconds).toFixed(0)} MiB/s)`),
      );
      const floorRate = run.floor ? mib(p.bytesTotal) / run.floor : null;
      if (p.label === "full restore" && p.deviceWrote !== null && floorRate !== null && mib(p.deviceWrote) / p.seconds < SLOW_RESTORE_SHARE * floorRate) {
        lines.push(
          `- ${tag}**warning**: Stowage's restore wrote at ${(mib(p.deviceWrote) / p.seconds).toFixed(0)} MiB/s, under half of the ${floorRate.toFixed(0)} MiB/s dd wrote durably in the same run: something other than the device held it back`,
        );
      }
    }
    lines.push(`- ${tag}Stowage node RSS peaks by phase (sampled): ${[...run.rssByPhase].map(([k, v]) => `${k} ${(v / 1024).toFixed(0)} MiB`).join(", ")}`);
    for (const n of run.notes) lines.push(`- ${tag}${n}`);
    const a = run.repoAfterFirst;
    lines.push(
      `- ${tag}repository bytes after the first backup: Stowage vault ${mib(a.stowage).toFixed(1)} MiB` +
        (opts.skipPeers ? "" : `, restic ${mib(a.restic).toFixed(1)} MiB, borg ${mib(a.borg).toFixed(1)} MiB`),
    );
  });
  return lines.join("\n") + "\n";
}

/** Headroom for sampling: peak RSS of one build at one size moves by a few MiB from run to run. */
const MEMORY_SLACK = 1.05;

/**
 * Peak RSS of the backup and the restore at 1 GiB and at a larger size: the median
 * of the runs' peaks, with their range. A run's peak depends on when V8 chose to
 * collect garbage, so one run in a few peaks tens of MiB above its siblings; the
 * median compares what each size typically reaches, the range shows the spread.
 */
function memoryReport(sizes: number[], bySize: RunResult[][]): string {
  const peaks = (runs: RunResult[], label: string) => runs.map((r) => r.phases.find((p) => p.label === label)!.peakRssKiB / 1024).sort((x, y) => x - y);
  const range = (v: number[]) => (v.length > 1 ? ` (${v[0].toFixed(0)}–${v[v.length - 1].toFixed(0)})` : "");
  const [small, large] = sizes.map((s) => `${mib(s) / 1024} GiB`);
  const n = bySize[0].length;
  const lines = ["", `Peak RSS of the Stowage process by disk size (${n > 1 ? `median of ${n} runs, range in brackets` : "1 run"}), node ${process.version}`, ""];
  lines.push(`| phase | ${small} (MiB) | ${large} (MiB) | ${large} / ${small} |`);
  lines.push("| --- | ---: | ---: | ---: |");
  const verdicts: string[] = [];
  for (const label of ["first backup", "full restore"]) {
    const [pa, pb] = bySize.map((runs) => peaks(runs, label));
    const [a, b] = [median(pa)!, median(pb)!];
    lines.push(`| ${label} | ${a.toFixed(0)}${range(pa)} | ${b.toFixed(0)}${range(pb)} | ${(b / a).toFixed(2)}× |`);
    verdicts.push(
      `- ${b <= a * MEMORY_SLACK ? "PASS" : "MISS"} ${label}: ${large} peaks no higher than ${small} (${b.toFixed(0)} vs ${a.toFixed(0)} MiB; within ${Math.round((MEMORY_SLACK - 1) * 100)}% for sampling)`,
    );
  }
  lines.push("", ...verdicts, "");
  bySize.forEach((runs, i) =>
    runs.forEach((run, k) => lines.push(`- ${mib(sizes[i]) / 1024} GiB, run ${k + 1}: RSS peaks by phase ${[...run.rssByPhase].map(([p, v]) => `${p} ${(v / 1024).toFixed(0)}`).join(", ")} MiB`)),
  );
  return lines.join("\n") + "\n";
}

function profileReport(run: RunResult): string {
  if (!run.profile) return "";
  return profileLines(`CPU profile of the service (${run.profile}), by phase:`, run.profile, run.windows).join("\n") + "\n";
}

async function main(): Promise<number> {
  const opts = options(process.argv.slice(2));
  const progs: Programs | null =
    opts.skipPeers || opts.memory ? null : { time: requireProgram("/usr/bin/time", "time"), restic: requireProgram("restic", "restic"), borg: requireProgram("borg", "borgbackup") };

  const tmp = await fsp.mkdtemp(path.join(opts.dir, "stowage-bench-"));
  await fsp.chmod(tmp, 0o755);
  onInterrupt(async () => {
    await live.svc?.stop().catch(() => undefined);
    if (!opts.keep) await fsp.rm(tmp, { recursive: true, force: true });
  }, log);

  try {
    if (opts.memory) {
      const sizes = [GiB, opts.memory];
      const bySize: RunResult[][] = [];
      for (const size of sizes) {
        log(`memory: image ${mib(size)} MiB, ${opts.runs} run(s)`);
        const runs: RunResult[] = [];
        for (let i = 1; i <= opts.runs; i++) {
          const dir = path.join(tmp, `${mib(size)}M-run${i}`);
          runs.push(await measure({ ...opts, size, skipPeers: true }, null, dir, i));
          if (!opts.keep) await fsp.rm(dir, { recursive: true, force: true });
        }
        bySize.push(runs);
      }
      process.stdout.write(memoryReport(sizes, bySize));
      return 0;
    }
    log(`working in ${tmp}; image ${mib(opts.size)} MiB, seed ${opts.seed}, ${opts.runs} run(s)`);
    const runs: RunResult[] = [];
    for (let i = 1; i <= opts.runs; i++) {
      const dir = path.join(tmp, `run${i}`);
      runs.push(await measure(opts, progs, dir, i));
      if (!opts.keep) await fsp.rm(dir, { recursive: true, force: true });
    }
    process.stdout.write(report(opts, runs));
    for (const run of runs) process.stdout.write(profileReport(run));
    return 0;
  } finally {
    if (live.svc) await live.svc.stop().catch(() => undefined);
    if (opts.keep) log(`kept ${tmp}`);
    else await fsp.rm(tmp, { recursive: true, force: true });
  }
}

runBench(main);
