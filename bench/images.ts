/**
 * Image benchmark: Stowage's image export and import against `qemu-img convert` on the same disk.
 *
 *   npm run bench:images                      # 1 GiB disk
 *   npm run bench:images -- --size 4G         # 4 GiB (or BENCH_SIZE_GIB=4)
 *   npm run bench:images -- --runs 3          # repeat the timed steps 3 times; the table shows medians (RSS: the max)
 *   npm run bench:images -- --cpu-prof        # also profile the service and print where its CPU time goes per timed job
 *   options: --keep (keep the temp dir), --dir DIR (where the temp dir goes; default $TMPDIR), --seed N,
 *   --dist[=DIR] (run the compiled build DIR/src/main.js, default dist/ from `npm run build`, instead of ts-node)
 *
 * Needs qemu-img (Debian package qemu-utils), /usr/bin/time (package time) and sha256sum. The disk
 * (about a third zeros, a third random bytes, a third English-like text; deterministic,
 * the same generator as bench/backup.ts) is written streaming to a sparse disk.raw in a
 * temp dir. Stowage runs as `node bin/stowage.js serve` on a fresh data dir with its
 * embedded Postgres and local blobs.
 *
 *  (a) export to QCOW2. Untimed: disk.raw is uploaded and imported as a DATA_DISK image
 *      (its checksum must be the content checksum of disk.raw). Timed: exportImage(format: QCOW2),
 *      from the mutation to the job's finishedAt; peer: `qemu-img convert -f raw -O qcow2
 *      disk.raw out.qcow2`, then `sha256sum out.qcow2`, then `sync out.qcow2` (Stowage's export
 *      is durable and has its sha256 when its job ends). The downloaded export must be identical
 *      to disk.raw by `qemu-img compare` (not timed).
 *  (b) import of a QCOW2 file. Untimed: `qemu-img convert -f raw -O qcow2 disk.raw in.qcow2`.
 *      Timed: POST /v1/uploads of in.qcow2 (its own row), then importImage(format: QCOW2)
 *      from the mutation to the job's finishedAt; peer: `qemu-img convert -f qcow2 -O raw
 *      in.qcow2 out.raw`, then `sha256sum out.raw`, then `sync out.raw`. The image's checksum must
 *      be the content checksum of disk.raw, and out.raw must be identical to disk.raw (not timed).
 *      Targets: the job at most 1.0x the peer, the upload plus the job (what a user waits for)
 *      at most 2.0x; the export at most 1.0x its peer.
 *  (c) peak RSS: VmHWM of the Stowage node process at the end (the whole run, untimed
 *      steps included; Postgres runs in its own processes), and the largest /usr/bin/time %M
 *      of the peer's steps.
 * Every timed step, Stowage's or the peer's, starts after an untimed `sync`, except the import
 * job, which follows its upload at once as it would for a user.
 * Jobs are polled every 250 ms; the time ends at finishedAt (stamped when the job turned
 * SUCCEEDED, same machine and clock), so the poll interval does not count.
 * Times are wall-clock: run it on an otherwise idle machine (the report shows the load).
 */
import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { profileLines } from "./lib/cpuprofile";
import { BARE_DIST, COMMON_FLAGS, commonOptions, parseFlags, runBench } from "./lib/cli";
import { layout, writeImage, type Region } from "./lib/image";
import { hrSeconds, onInterrupt, procStatusKiB, requireProgram, run, settle, timedSteps } from "./lib/proc";
import { f2, log, median, mib, ratioOf, table, targetTable, x } from "./lib/report";
import { StowageProcess, timeJob, type JobTiming } from "./lib/stowage";
import { downloadFile, uploadFile } from "./lib/transfer";
import { DEFAULT_LIMITS, openImage } from "../src/formats";
import { checksumOf } from "../src/formats/checksum";

/** A peer's work end to end: `qemu-img convert`, then `sha256sum` of its output, then `sync` of it. */
interface PeerTiming {
  seconds: number;
  convert: number;
  sha256sum: number;
  sync: number;
}

interface RunResult {
  exportS: JobTiming;
  exportPeer: PeerTiming;
  exportBytes: number;
  exportPeerBytes: number;
  uploadS: number;
  importS: JobTiming;
  importPeer: PeerTiming;
  peerRssKiB: number;
}

const live: { svc: StowageProcess | null } = { svc: null };

const IMAGE_Q = `query ($id: ID!) { node(id: $id) { ... on Image { status checksum virtualSizeBytes sizeBytes error { code message } } } }`;
const EXPORT_Q = `query ($id: ID!) { node(id: $id) { ... on ImageExport { status format sizeBytes sha256 downloadUrl } } }`;

async function qemuCompare(qemuImg: string, a: string, b: string, what: string): Promise<void> {
  const r = await run(qemuImg, ["compare", a, b]);
  if (r.code !== 0 || !/Images are identical/.test(r.stdout)) throw new Error(`${what}: qemu-img compare ${path.basename(a)} ${path.basename(b)} says: ${(r.stdout + r.stderr).trim()}`);
}

async function main(): Promise<number> {
  const opts = commonOptions(parseFlags(__filename, process.argv.slice(2), COMMON_FLAGS, BARE_DIST));
  const qemuImg = requireProgram("/usr/bin/qemu-img", "qemu-utils");
  const time = requireProgram("/usr/bin/time", "time");
  const sha256sum = requireProgram("sha256sum", "coreutils");
  /** The peer's work end to end: `qemu-img convert ARGS`, then `sha256sum` of its output (the last argument), then `sync` of it. */
  const peer = async (args: string[], dir: string) => {
    const out = args[args.length - 1];
    const r = await timedSteps(
      time,
      [
        [qemuImg, ["convert", ...args]],
        [sha256sum, [out]],
        ["sync", [out]],
      ],
      { tmp: dir },
    );
    const timing: PeerTiming = { seconds: r.seconds, convert: r.steps[0], sha256sum: r.steps[1], sync: r.steps[2] };
    return { timing, maxRssKiB: r.maxRssKiB, sha256: r.stdout[1].split(/\s/)[0] };
  };

  const tmp = await fsp.mkdtemp(path.join(opts.dir, "stowage-bench-images-"));
  await fsp.chmod(tmp, 0o755);
  onInterrupt(async () => {
    await live.svc?.stop().catch(() => undefined);
    if (!opts.keep) await fsp.rm(tmp, { recursive: true, force: true });
  }, log);

  try {
    const size = opts.size;
    const loadStart = os.loadavg()[0];
    if (loadStart > os.cpus().length / 2) log(`warning: load average ${loadStart.toFixed(2)} on ${os.cpus().length} CPUs: other work will skew the times`);
    log(`working in ${tmp}; disk ${mib(size)} MiB, seed ${opts.seed}, ${opts.runs} run(s)`);

    // ---- the disk and the QCOW2 to import (untimed) ------------------------------------
    const files = path.join(tmp, "files");
    await fsp.mkdir(files, { recursive: true, mode: 0o755 });
    const raw = path.join(files, "disk.raw");
    const regions = layout(size, opts.seed);
    let t = hrSeconds();
    const sha0 = await writeImage(raw, size, regions, opts.seed);
    // The image's checksum is its content checksum (over its non-zero blocks), the same from any file of it.
    const content = await contentChecksumOf(raw);
    log(`disk.raw written in ${(hrSeconds() - t).toFixed(1)} s (sha256 ${sha0.slice(0, 16)}…, content checksum ${content.slice(0, 16)}…)`);
    const inQcow2 = path.join(files, "in.qcow2");
    const made = await run(qemuImg, ["convert", "-f", "raw", "-O", "qcow2", raw, inQcow2]);
    if (made.code !== 0) throw new Error(`qemu-img convert (making in.qcow2) failed:\n${made.stderr}`);
    const inQcow2Bytes = (await fsp.stat(inQcow2)).size;
    log(`in.qcow2 made by qemu-img: ${mib(inQcow2Bytes).toFixed(1)} MiB`);

    // ---- Stowage: start, import disk.raw as the image to export (untimed) ---------------
    const profDir = path.join(tmp, "prof");
    const svc = await StowageProcess.start(path.join(tmp, "stowage", "data"), {
      env: { GC_INTERVAL_SECONDS: "0" },
      nodeArgs: opts.cpuProf ? ["--cpu-prof", `--cpu-prof-dir=${profDir}`] : [],
      dist: opts.dist,
    });
    live.svc = svc;
    log(`Stowage serving at ${svc.url} (pid ${svc.pid})`);
    t = hrSeconds();
    const rawUpload = await uploadFile(svc, raw);
    if (rawUpload.sha256 !== sha0 || rawUpload.sizeBytes !== size) throw new Error(`the upload of disk.raw answered sha256 ${rawUpload.sha256} / ${rawUpload.sizeBytes} bytes`);
    const imp0 = await svc.gql(`mutation ($u: String!) { importImage(input: { name: "bench-raw", uploadId: $u, type: DATA_DISK, format: RAW }) { image { id } job { id } } }`, { u: rawUpload.id });
    await svc.waitJob(imp0.importImage.job.id, 250);
    const rawImageId: string = imp0.importImage.image.id;
    const rawImage = (await svc.gql(IMAGE_Q, { id: rawImageId })).node;
    if (rawImage.status !== "ACTIVE" || rawImage.checksum !== content)
      throw new Error(`the image imported from disk.raw is ${rawImage.status} with checksum ${rawImage.checksum}, expected ACTIVE ${content}`);
    log(`disk.raw uploaded and imported in ${(hrSeconds() - t).toFixed(1)} s (untimed; image ${rawImageId})`);

    const runs: RunResult[] = [];
    const notes: string[] = [];
    for (let i = 1; i <= opts.runs; i++) {
      const dir = path.join(tmp, `run${i}`);
      await fsp.mkdir(dir, { recursive: true, mode: 0o755 });
      let peerRssKiB = 0;

      // ---- (a) export to QCOW2 -------------------------------------------------------
      await settle();
      const exp = await timeJob(svc, "export QCOW2", async () => {
        const r = await svc.gql(`mutation ($i: ID!) { exportImage(input: { imageId: $i, format: QCOW2 }) { export { id } job { id } } }`, { i: rawImageId });
        return { jobId: r.exportImage.job.id as string, result: r.exportImage.export.id as string };
      });
      const expInfo = (await svc.gql(EXPORT_Q, { id: exp.result })).node;
      if (expInfo.status !== "READY") throw new Error(`the export is ${expInfo.status} after its job succeeded, expected READY`);
      const exported = path.join(dir, "stowage-export.qcow2");
      const got = await downloadFile(svc, expInfo.downloadUrl, exported);
      if (got.sha256 !== expInfo.sha256 || got.bytes !== expInfo.sizeBytes) {
        throw new Error(`the downloaded export (${got.bytes} bytes, sha256 ${got.sha256}) differs from ImageExport sizeBytes ${expInfo.sizeBytes} / sha256 ${expInfo.sha256}`);
      }
      await qemuCompare(qemuImg, raw, exported, "Stowage QCOW2 export");
      log(`Stowage export verified: qemu-img compare says identical (${mib(got.bytes).toFixed(1)} MiB file)`);
      await run(qemuImg, ["check", exported]).then((r) => {
        if (r.code !== 0) throw new Error(`qemu-img check of the Stowage export failed:\n${r.stdout}${r.stderr}`);
      });
      await fsp.rm(exported, { force: true });

      const peerOut = path.join(dir, "out.qcow2");
      await settle();
      const pe = await peer(["-f", "raw", "-O", "qcow2", raw, peerOut], dir);
      peerRssKiB = Math.max(peerRssKiB, pe.maxRssKiB);
      const exportPeerBytes = (await fsp.stat(peerOut)).size;
      log(`qemu-img convert raw→qcow2, sha256sum, sync: ${pe.timing.seconds.toFixed(2)} s (${mib(exportPeerBytes).toFixed(1)} MiB file)`);
      await fsp.rm(peerOut, { force: true });

      // ---- (b) import of a QCOW2 file ------------------------------------------------
      await settle();
      const t0 = hrSeconds();
      const up = await uploadFile(svc, inQcow2);
      const uploadS = hrSeconds() - t0;
      if (up.sizeBytes !== inQcow2Bytes) throw new Error(`the upload of in.qcow2 answered ${up.sizeBytes} bytes, the file has ${inQcow2Bytes}`);
      log(`Stowage upload of in.qcow2: ${uploadS.toFixed(2)} s`);
      // No settle here: the user waits for the upload and the import one after the other.
      const imp = await timeJob(svc, "import QCOW2", async () => {
        const r = await svc.gql(`mutation ($u: String!, $n: String!) { importImage(input: { name: $n, uploadId: $u, type: DATA_DISK, format: QCOW2 }) { image { id } job { id } } }`, {
          u: up.id,
          n: `bench-qcow2-${i}`,
        });
        return { jobId: r.importImage.job.id as string, result: r.importImage.image.id as string };
      });
      const img = (await svc.gql(IMAGE_Q, { id: imp.result })).node;
      if (img.status !== "ACTIVE" || img.checksum !== content || img.virtualSizeBytes !== size) {
        throw new Error(`the image imported from in.qcow2 is ${img.status}, checksum ${img.checksum}, virtual size ${img.virtualSizeBytes}; expected ACTIVE, ${content}, ${size}`);
      }
      log("Stowage QCOW2 import verified: image checksum = content checksum of disk.raw");
      if (i === 1) notes.push(`image imported from in.qcow2: sizeBytes ${mib(img.sizeBytes).toFixed(1)} MiB (virtual ${mib(img.virtualSizeBytes).toFixed(0)} MiB)`);
      // The image stays: deleting it now would load the service with garbage collection later.

      const peerRaw = path.join(dir, "out.raw");
      await settle();
      const pi = await peer(["-f", "qcow2", "-O", "raw", inQcow2, peerRaw], dir);
      peerRssKiB = Math.max(peerRssKiB, pi.maxRssKiB);
      if (pi.sha256 !== sha0) throw new Error(`sha256sum of qemu-img's out.raw is ${pi.sha256}, disk.raw's is ${sha0}`);
      log(`qemu-img convert qcow2→raw, sha256sum, sync: ${pi.timing.seconds.toFixed(2)} s (peak RSS ${(pi.maxRssKiB / 1024).toFixed(0)} MiB)`);
      await qemuCompare(qemuImg, raw, peerRaw, "qemu-img's own raw output");
      await fsp.rm(peerRaw, { force: true });

      runs.push({ exportS: exp.timing, exportPeer: pe.timing, exportBytes: got.bytes, exportPeerBytes, uploadS, importS: imp.timing, importPeer: pi.timing, peerRssKiB });
      if (!opts.keep) await fsp.rm(dir, { recursive: true, force: true });
    }

    const stowageRssKiB = procStatusKiB(svc.pid, "VmHWM");
    await svc.stop();
    live.svc = null;
    const loadEnd = os.loadavg()[0];
    let profile: string | null = null;
    if (opts.cpuProf) {
      const prof = (await fsp.readdir(profDir).catch(() => [] as string[])).find((f) => f.endsWith(".cpuprofile"));
      if (!prof) log("no .cpuprofile was written (did the service exit cleanly?)");
      else {
        profile = path.join(opts.dir, `stowage-bench-images-${Date.now()}.cpuprofile`);
        await fsp.copyFile(path.join(profDir, prof), profile);
      }
    }

    // ---- the report ------------------------------------------------------------------
    const med = (f: (r: RunResult) => number) => median(runs.map(f));
    const exportS = med((r) => r.exportS.seconds);
    const exportPeer = med((r) => r.exportPeer.seconds);
    const uploadS = med((r) => r.uploadS);
    const importS = med((r) => r.importS.seconds);
    const importPeer = med((r) => r.importPeer.seconds);
    const upImp = med((r) => r.uploadS + r.importS.seconds);
    const exportBytes = med((r) => r.exportBytes);
    const exportPeerBytes = med((r) => r.exportPeerBytes);
    const peerRss = Math.max(...runs.map((r) => r.peerRssKiB));
    const share = (k: Region["kind"]) => regions.filter((r) => r.kind === k).reduce((n, r) => n + r.length, 0);
    const rate = (s: number | null) => (s ? `${(mib(size) / s).toFixed(0)} MiB/s` : "n/a");
    // Each step's own median: they need not add up to the median of the whole.
    const steps = (f: (r: RunResult) => PeerTiming) => `(${f2(med((r) => f(r).convert))} + ${f2(med((r) => f(r).sha256sum))} + ${f2(med((r) => f(r).sync))})`;

    const lines: string[] = [""];
    lines.push(
      `Image benchmark: ${mib(size)} MiB disk (zeros ${mib(share("zero")).toFixed(0)} MiB, random ${mib(share("random")).toFixed(0)} MiB, text ${mib(share("text")).toFixed(0)} MiB), ` +
        `in.qcow2 ${mib(inQcow2Bytes).toFixed(1)} MiB; ${os.cpus().length} CPUs, node ${process.version}, ${(await run(qemuImg, ["--version"])).stdout.split("\n")[0]}` +
        (runs.length > 1 ? `; median of ${runs.length} runs (peak RSS: max)` : ""),
    );
    lines.push("");
    lines.push(
      ...table(
        ["", "Stowage", "qemu-img convert, sha256sum, sync", "Stowage/peer"],
        [
          ["(a) export raw image → QCOW2 (s)", `${f2(exportS)} (${rate(exportS)})`, `${f2(exportPeer)} ${steps((r) => r.exportPeer)}`, x(ratioOf(exportS, exportPeer))],
          ["(a) QCOW2 file written (MiB)", f2(exportBytes === null ? null : mib(exportBytes)), f2(exportPeerBytes === null ? null : mib(exportPeerBytes)), x(ratioOf(exportBytes, exportPeerBytes))],
          ["(b) upload of in.qcow2 (s)", `${f2(uploadS)} (${uploadS ? (mib(inQcow2Bytes) / uploadS).toFixed(0) : "n/a"} MiB/s)`, "—", "—"],
          ["(b) import QCOW2 job (s)", `${f2(importS)} (${rate(importS)})`, `${f2(importPeer)} ${steps((r) => r.importPeer)}`, x(ratioOf(importS, importPeer))],
          ["(b) upload + import (s)", f2(upImp), f2(importPeer), x(ratioOf(upImp, importPeer))],
          ["(c) peak RSS (MiB)", stowageRssKiB === null ? "n/a" : (stowageRssKiB / 1024).toFixed(0), (peerRss / 1024).toFixed(0), x(ratioOf(stowageRssKiB, peerRss), 1)],
        ],
      ),
    );
    lines.push("");
    lines.push(
      ...targetTable([
        { name: "(a) export to QCOW2", stowage: exportS, peerName: "`qemu-img convert -O qcow2`, `sha256sum`, `sync`", peer: exportPeer, max: 1 },
        { name: "(b) import of QCOW2, the job", stowage: importS, peerName: "`qemu-img convert -O raw`, `sha256sum`, `sync`", peer: importPeer, max: 1 },
        { name: "(b) upload + import of QCOW2", stowage: upImp, peerName: "`qemu-img convert -O raw`, `sha256sum`, `sync`", peer: importPeer, max: 2 },
      ]),
    );
    lines.push("");
    lines.push("Details:");
    lines.push(
      `- verified (not timed): the downloaded export matches ImageExport sha256/sizeBytes, passes \`qemu-img check\` and \`qemu-img compare disk.raw\` says identical; the image imported from in.qcow2 has the content checksum of disk.raw and the full virtual size; qemu-img's out.raw compares identical too`,
    );
    lines.push(
      `- Stowage times run from the mutation to the job's finishedAt; the image exported is a DATA_DISK image imported (untimed) from disk.raw; the upload is the POST /v1/uploads of in.qcow2 until its 201`,
    );
    lines.push(
      `- peak RSS: Stowage = VmHWM of the node service process over the whole run (uploads, untimed import of disk.raw and the downloads included; Postgres runs in its own processes); peer = /usr/bin/time %M, max over its steps`,
    );
    lines.push(
      `- the peer's time is \`qemu-img convert\`, then \`sha256sum\` of its output, then \`sync\` of that file (in brackets: each step's median): a file as durable, with its SHA-256 known, as Stowage's export or image is when its job ends; each timed phase of either starts after an untimed \`sync\`, but the import job follows its upload at once`,
    );
    lines.push(`- load average (1 min) ${loadStart.toFixed(2)} at the start, ${loadEnd.toFixed(2)} at the end, on ${os.cpus().length} CPUs (times are only comparable on an otherwise idle machine)`);
    runs.forEach((r, i) => {
      const tag = runs.length > 1 ? `run ${i + 1}: ` : "";
      const job = (label: string, j: JobTiming) =>
        `- ${tag}Stowage ${label}: ${j.seconds.toFixed(2)} s = mutation ${j.mutationMs.toFixed(0)} ms, job created→started ${j.queuedMs.toFixed(0)} ms, ran ${j.runMs.toFixed(0)} ms; CPU: node ${j.nodeCpu.toFixed(2)} s, Postgres ${j.pgCpu.toFixed(2)} s`;
      lines.push(job("export QCOW2", r.exportS));
      lines.push(job("import QCOW2", r.importS));
      if (runs.length > 1)
        lines.push(
          `- ${tag}peer raw→qcow2 ${r.exportPeer.seconds.toFixed(2)} s (convert ${r.exportPeer.convert.toFixed(2)} s), qcow2→raw ${r.importPeer.seconds.toFixed(2)} s (convert ${r.importPeer.convert.toFixed(2)} s); upload ${r.uploadS.toFixed(2)} s`,
        );
    });
    for (const n of notes) lines.push(`- ${n}`);
    if (profile) {
      const windows = runs.flatMap((r, i) => [r.exportS.window, r.importS.window].map((w) => ({ ...w, label: runs.length > 1 ? `run ${i + 1}: ${w.label}` : w.label })));
      lines.push(...profileLines(`CPU profile of the service's main thread (${profile}), by timed job:`, profile, windows));
    }
    process.stdout.write(lines.join("\n") + "\n");
    return 0;
  } finally {
    if (live.svc) await live.svc.stop().catch(() => undefined);
    if (opts.keep) log(`kept ${tmp}`);
    else await fsp.rm(tmp, { recursive: true, force: true });
  }
}

runBench(main);

/** The content checksum of a raw file, as `stowage checksum` computes it. */
async function contentChecksumOf(file: string): Promise<string> {
  const fd = await fs.promises.open(file, "r");
  try {
    const size = (await fd.stat()).size;
    const src = { size, read: async (offset: number, length: number) => (await fd.read(Buffer.alloc(length), 0, length, offset)).buffer };
    return await checksumOf(await openImage("RAW", src, { ...DEFAULT_LIMITS, maxVirtualSize: size }));
  } finally {
    await fd.close();
  }
}
