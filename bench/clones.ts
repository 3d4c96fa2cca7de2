/**
 * Instant restore and clones: disks made from a backup or an image with no copy,
 * against the copy they replace and against `qemu-img create -b` overlays, in one run.
 *
 *   npm run bench:clones                      # an 8 GiB backup, a 1 GiB image, 100 servers
 *   npm run bench:clones -- --size 2G         # a smaller backup (or BENCH_SIZE_GIB)
 *   options: --servers N (default 100), --image-size SIZE (default 1G), --keep, --dir DIR,
 *   --seed N, --dist[=DIR] (the compiled build; default dist/, as `npm start` runs it)
 *
 * Needs qemu-img, qemu-io (qemu-utils) and nbdcopy (libnbd-bin). Stowage runs on a fresh
 * data dir in a temp dir, with its embedded Postgres and local blobs, NBD on a free port.
 * The data is the generator of bench/backup.ts: a third zeros never written, a third
 * random bytes, a third English-like text.
 *
 *   first byte        a disk of --size holding the data is backed up (untimed). Timed: from
 *                     `createDisk(backupId)` to the first 4 KiB read over NBD by `qemu-io`
 *                     (createDisk, createNbdExport, the read), and from `restoreBackup` onto
 *                     a blank disk to the same read, against restoring the same backup by
 *                     copy onto another blank disk (`restoreBackup` with `hydrate`, until its
 *                     job succeeds, then the same export and read). Target: at most 1 s.
 *   100 servers       a SYSTEM_DISK image of --image-size (untimed); then --servers ×
 *                     `createServer(imageId)`, one after another; the storage added (blob
 *                     files and the database's table files) per server. The anchor: as many
 *                     `qemu-img create -f qcow2 -b base.raw -F raw` overlays of a raw file of
 *                     the image on the same file system. Targets: under 10 s in all, under
 *                     1 MiB stored per server.
 *   sequential read   `nbdcopy URI null:` of a fresh clone (its blocks all in the vault: read,
 *                     decompressed and checked) against the same read of a hydrated disk of the
 *                     same image (its blocks in its own segments). Target: at least 0.5×.
 *   first backup      1% of a fresh clone of the image rewritten (scattered 64 KiB blocks, over
 *                     HTTP), then its first backup: the bytes it adds to the vault against the
 *                     bytes changed. Target: at most 2×.
 */
import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { COMMON_FLAGS, commonOptions, parseFlags, parseSize, runBench, int, type CommonOptions } from "./lib/cli";
import { changes, dirBytes, GiB, layout, MiB, writeImage, type Region } from "./lib/image";
import { freePort, hrSeconds, onInterrupt, requireProgram, run, settle } from "./lib/proc";
import { f2, log, mib, ratioOf, table, verdict, x } from "./lib/report";
import { StowageProcess } from "./lib/stowage";

interface Options extends CommonOptions {
  servers: number;
  imageSize: number;
}

function options(argv: string[]): Options {
  const v = parseFlags(__filename, argv, { ...COMMON_FLAGS, servers: { type: "string" }, "image-size": { type: "string" } }, { dist: path.join(__dirname, "..", "dist") });
  const common = commonOptions({ ...v, size: v.size ?? (process.env.BENCH_SIZE_GIB ? `${process.env.BENCH_SIZE_GIB}G` : "8G") });
  return { ...common, servers: int(v.servers, "--servers", 100), imageSize: v["image-size"] ? parseSize(v["image-size"], "--image-size") : GiB };
}

/** Fills a disk with the data regions of `file` (holes stay holes) over HTTP. */
async function fill(svc: StowageProcess, diskId: string, file: string, regions: Region[]): Promise<void> {
  for (const r of regions) {
    if (r.kind === "zero") continue;
    await svc.put(diskId, r.start, r.length, fs.createReadStream(file, { start: r.start, end: r.start + r.length - 1, highWaterMark: 4 * MiB }));
  }
}

async function main(): Promise<number> {
  const opts = options(process.argv.slice(2));
  const qemuImg = requireProgram("qemu-img", "qemu-utils");
  const qemuIo = requireProgram("qemu-io", "qemu-utils");
  const nbdcopy = requireProgram("nbdcopy", "libnbd-bin");
  const tmp = await fsp.mkdtemp(path.join(opts.dir, "stowage-bench-clones-"));
  let svc: StowageProcess | null = null;
  const cleanup = async () => {
    await svc?.stop();
    if (!opts.keep) await fsp.rm(tmp, { recursive: true, force: true });
  };
  onInterrupt(cleanup, log);
  try {
    if (opts.dist) await run("npm", ["run", "-s", "build"], { cwd: path.join(__dirname, "..") });
    svc = await StowageProcess.start(path.join(tmp, "data"), { dist: opts.dist, env: { NBD_PORT: String(await freePort()), GC_INTERVAL_SECONDS: "0", SCHEDULER_INTERVAL_SECONDS: "0" } });
    const s = svc;
    const exportOf = async (id: string) => (await s.gql(`mutation ($id: ID!) { createNbdExport(input: { resourceId: $id }) { nbdExport { uri } } }`, { id })).createNbdExport.nbdExport.uri as string;
    const firstByte = async (uri: string) => {
      const r = await run(qemuIo, ["-f", "raw", "-r", "-c", "read 0 4096", uri]);
      if (r.code !== 0 || !r.stdout.includes("read 4096/4096 bytes")) throw new Error(`qemu-io: ${r.stdout} ${r.stderr}`);
    };

    // 1. The first byte of a disk made from a backup.
    log(`writing a ${mib(opts.size).toFixed(0)} MiB source image and backing it up`);
    const bigRegions = layout(opts.size, opts.seed);
    const bigFile = path.join(tmp, "big.raw");
    await writeImage(bigFile, opts.size, bigRegions, opts.seed);
    const bigDisk = await s.createDisk("big", opts.size);
    await fill(s, bigDisk, bigFile, bigRegions);
    await fsp.rm(bigFile);
    const b = (await s.gql(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: bigDisk })).createBackup;
    await s.waitJob(b.job.id);
    await settle();
    let t0 = hrSeconds();
    const clone = (await s.gql(`mutation ($b: ID!) { createDisk(input: { name: "instant", backupId: $b }) { disk { id } } }`, { b: b.backup.id })).createDisk.disk.id;
    await firstByte(await exportOf(clone));
    const instant = hrSeconds() - t0;
    await settle();
    const restoreQuery = `mutation ($b: ID!, $d: ID!, $h: Boolean) { restoreBackup(input: { backupId: $b, targetDiskId: $d, hydrate: $h }) { job { id } } }`;
    const restoredDisk = await s.createDisk("restored", opts.size);
    t0 = hrSeconds();
    await s.gql(restoreQuery, { b: b.backup.id, d: restoredDisk, h: false });
    await firstByte(await exportOf(restoredDisk));
    const restored = hrSeconds() - t0;
    await settle();
    const blank = await s.createDisk("copied", opts.size);
    t0 = hrSeconds();
    const r = (await s.gql(restoreQuery, { b: b.backup.id, d: blank, h: true })).restoreBackup;
    await s.waitJob(r.job.id);
    await firstByte(await exportOf(blank));
    const copied = hrSeconds() - t0;
    log(`first byte: clone ${f2(instant)} s, restore ${f2(restored)} s, restore by copy ${f2(copied)} s`);

    // 2. Servers from one image, against qemu-img overlays.
    log(`making a ${mib(opts.imageSize).toFixed(0)} MiB SYSTEM_DISK image`);
    const imgRegions = layout(opts.imageSize, opts.seed + 1);
    const base = path.join(tmp, "base.raw");
    await writeImage(base, opts.imageSize, imgRegions, opts.seed + 1);
    const gold = (
      await s.gql(`mutation ($s: SafeInt!) { createServer(input: { name: "gold", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: $s }) { server { disks { nodes { id } } } } }`, { s: opts.imageSize })
    ).createServer.server.disks.nodes[0].id;
    await fill(s, gold, base, imgRegions);
    const img = (await s.gql(`mutation ($d: ID!) { createImage(input: { name: "gold", diskId: $d, type: SYSTEM_DISK }) { image { id } job { id } } }`, { d: gold })).createImage;
    await s.waitJob(img.job.id);
    // The database's table files (not its write-ahead log, whose segments come 16 MiB at a time and are recycled).
    const dbSize = () => dirBytes(path.join(fs.realpathSync(path.join(s.dataDir, "postgres")), "base"));
    await settle();
    const blobsBefore = await dirBytes(path.join(s.dataDir, "blobs"));
    const dbBefore = await dbSize();
    const serverDisks: string[] = [];
    t0 = hrSeconds();
    for (let i = 0; i < opts.servers; i++) {
      const made = (
        await s.gql(`mutation ($i: ID!, $n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, imageId: $i }) { server { status disks { nodes { id } } } } }`, {
          i: img.image.id,
          n: `web-${i}`,
        })
      ).createServer.server;
      if (made.status !== "ACTIVE") throw new Error(`server ${i} is ${made.status}`);
      serverDisks.push(made.disks.nodes[0].id);
    }
    const servers = hrSeconds() - t0;
    await settle();
    const grown = (await dirBytes(path.join(s.dataDir, "blobs"))) - blobsBefore + ((await dbSize()) - dbBefore);
    const overlays = path.join(tmp, "overlays");
    await fsp.mkdir(overlays);
    t0 = hrSeconds();
    for (let i = 0; i < opts.servers; i++) {
      const o = await run(qemuImg, ["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", path.join(overlays, `web-${i}.qcow2`)]);
      if (o.code !== 0) throw new Error(`qemu-img create: ${o.stderr}`);
    }
    await run("sync", []);
    const qemu = hrSeconds() - t0;
    const qemuBytes = await dirBytes(overlays);
    log(`${opts.servers} servers: Stowage ${f2(servers)} s, ${(grown / opts.servers / 1024).toFixed(1)} KiB each; qemu-img ${f2(qemu)} s, ${(qemuBytes / opts.servers / 1024).toFixed(1)} KiB each`);

    // 3. Sequential read of a fresh clone against a hydrated disk of the same image.
    const fresh = serverDisks[1];
    const hydrated = serverDisks[2];
    const h = (await s.gql(`mutation ($id: ID!) { hydrateDisk(input: { id: $id }) { job { id } } }`, { id: hydrated })).hydrateDisk;
    await s.waitJob(h.job.id);
    const readAll = async (uri: string) => {
      await settle();
      const t = hrSeconds();
      const o = await run(nbdcopy, [uri, "null:"]);
      if (o.code !== 0) throw new Error(`nbdcopy: ${o.stderr}`);
      return hrSeconds() - t;
    };
    const readHydrated = await readAll(await exportOf(hydrated));
    const readFresh = await readAll(await exportOf(fresh));
    log(`sequential read: fresh clone ${f2(readFresh)} s, hydrated ${f2(readHydrated)} s`);

    // 4. The first backup of a clone after 1% of it changed.
    const changed = serverDisks[3];
    const list = changes(opts.imageSize, 0.01, opts.seed + 2);
    for (const c of list) await s.put(changed, c.offset, c.data.length, c.data);
    const cb = (await s.gql(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: changed })).createBackup;
    await s.waitJob(cb.job.id);
    const stored = (await s.gql(`query ($id: ID!) { node(id: $id) { ... on Backup { storedBytes } } }`, { id: cb.backup.id })).node.storedBytes as number;
    const changedBytes = list.length * 64 * 1024;

    const perServer = grown / opts.servers;
    const rows = [
      ["first byte of a disk from an 8 GiB-class backup (s)", f2(instant), "restore by copy", f2(copied), x(ratioOf(instant, copied), 3), "≤ 1 s", verdict(instant <= 1)],
      ["first byte after restoreBackup onto a disk (s)", f2(restored), "restore by copy", f2(copied), x(ratioOf(restored, copied), 3), "≤ 1 s", verdict(restored <= 1)],
      [`${opts.servers} servers from one image (s)`, f2(servers), "`qemu-img create -b` overlays", f2(qemu), x(ratioOf(servers, qemu)), "< 10 s", verdict(servers < 10)],
      [
        "stored per server (KiB)",
        (perServer / 1024).toFixed(1),
        "qcow2 overlay file",
        (qemuBytes / opts.servers / 1024).toFixed(1),
        x(ratioOf(perServer, qemuBytes / opts.servers)),
        "< 1024 KiB",
        verdict(perServer < MiB),
      ],
      [
        "sequential read, fresh clone (MiB/s)",
        (mib(opts.imageSize) / readFresh).toFixed(0),
        "hydrated disk",
        (mib(opts.imageSize) / readHydrated).toFixed(0),
        x(ratioOf(readHydrated, readFresh)),
        "≥ 0.5×",
        verdict(readHydrated / readFresh >= 0.5),
      ],
      [
        "first backup after 1% changed (MiB stored)",
        mib(stored).toFixed(2),
        "bytes changed",
        mib(changedBytes).toFixed(2),
        x(ratioOf(stored, changedBytes)),
        "≤ 2×",
        verdict(stored <= 2 * changedBytes),
      ],
    ];
    const lines = [
      `Instant restore and clones: backup ${mib(opts.size).toFixed(0)} MiB, image ${mib(opts.imageSize).toFixed(0)} MiB, ${opts.servers} servers; ${os.cpus().length} cores, load ${os
        .loadavg()
        .map((l) => l.toFixed(2))
        .join(" ")}`,
      "",
      ...table(["workload", "Stowage", "peer", "peer value", "Stowage/peer", "target", ""], rows),
    ];
    process.stdout.write(`${lines.join("\n")}\n`);
    return rows.every((row) => row[6] !== "MISS") ? 0 : 2;
  } finally {
    await cleanup();
  }
}

runBench(main);
