import { execFile, execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { fromGlobalId } from "../../src/services/global-id";
import { checksumOfPieces } from "../helpers/checksum";
import { bytes, readDisk, succeed, waitJob, writeDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { qemuImg, sparseFile, tmpDir } from "../helpers/formats";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

/**
 * Real sizes, end to end: a sparse 10 GiB cloud image with a few hundred MiB of data
 * goes in, becomes a server, is backed up, restored and exported in every format;
 * 1 TiB disks cost what they hold; files and offsets cross 2^31 and 2^32. Every
 * result is compared with qemu-img. The files are sparse, so this runs in seconds.
 */

const TiB = 1024 * GiB;
/** These move GiBs through HTTP, the vault and qemu-img: minutes on a busy 2-core machine. */
const LONG = 10 * 60_000;
const BLOCK = 64 * 1024;

let svc: TestService;
let work: { dir: string; cleanup(): void };
let q: string | null;
let curl: string | null;
const run = promisify(execFile);

beforeAll(async () => {
  q = qemuImg();
  curl = requireProgram(["/usr/bin/curl"], "curl");
  svc = await startTestService();
  work = tmpDir("stowage-real-sizes-");
});
afterAll(async () => {
  await svc?.stop();
  work?.cleanup();
});

/** Pieces of a sparse disk: what a raw file holds at each offset, zeros elsewhere. */
type Piece = { offset: number; data: Buffer };

const rawId = (globalId: string) => fromGlobalId(globalId)!.id;

/** Blocks a job visited: its work, which must follow the data, not the disk's size. */
async function visited(jobId: string): Promise<number> {
  const [row] = await svc.ds.query(`SELECT blocks_visited FROM jobs WHERE id = $1`, [rawId(jobId)]);
  return Number(row.blocks_visited);
}

/** Uploads a file as the README says to, with `curl -T`, which streams it. */
async function uploadFile(file: string): Promise<{ id: string; sizeBytes: number; sha256: string }> {
  const { stdout } = await run(curl!, ["-fsS", "-T", file, "-X", "POST", "-H", `Authorization: Bearer ${svc.keys.alpha}`, `${svc.url}/v1/uploads`], { maxBuffer: 1 << 20 });
  return JSON.parse(stdout) as { id: string; sizeBytes: number; sha256: string };
}

const IMAGE = `query ($id: ID!) { node(id: $id) { ... on Image { id status type virtualSizeBytes minDiskBytes sizeBytes checksum error { code message } } } }`;

async function importFile(file: string, type = "SYSTEM_DISK"): Promise<{ image: any; jobId: string }> {
  const up = await uploadFile(file);
  const r = (
    await svc.ok(`mutation ($i: ImportImageInput!) { importImage(input: $i) { image { id } job { id } } }`, { i: { name: path.basename(file).replace(/[^a-z0-9-]/gi, "-"), uploadId: up.id, type } })
  ).importImage;
  await succeed(svc, r.job.id);
  return { image: (await svc.ok(IMAGE, { id: r.image.id })).node, jobId: r.job.id };
}

async function imageOf(input: Record<string, unknown>): Promise<{ image: any; jobId: string }> {
  const r = (await svc.ok(`mutation ($i: CreateImageInput!) { createImage(input: $i) { image { id } job { id } } }`, { i: input })).createImage;
  await succeed(svc, r.job.id);
  return { image: (await svc.ok(IMAGE, { id: r.image.id })).node, jobId: r.job.id };
}

/** Exports an image; returns the export and the path of its file in the blob store. */
async function exportTo(imageId: string, format: string): Promise<{ exp: any; file: string; jobId: string }> {
  const r = (await svc.ok(`mutation ($i: ID!, $f: DiskFormat!) { exportImage(input: { imageId: $i, format: $f }) { export { id } job { id } } }`, { i: imageId, f: format })).exportImage;
  await succeed(svc, r.job.id);
  const exp = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on ImageExport { id status format sizeBytes sha256 downloadUrl error { code } } } }`, { id: r.export.id })).node;
  return { exp, file: path.join(svc.dataDir, "blobs", "exports", svc.projectIds.alpha, rawId(exp.id)), jobId: r.job.id };
}

const DRIVER: Record<string, string> = { RAW: "raw", QCOW2: "qcow2", VMDK: "vmdk", VHD: "vpc" };

/** qemu-img's word that `file` (in `format`) holds the same disk as the raw `reference`. */
function compareWithQemu(format: string, file: string, reference: string): void {
  // qemu-img checks qcow2 and vmdk; it has no check for raw or vpc.
  if (format === "QCOW2" || format === "VMDK") execFileSync(q!, ["check", "-q", "-f", DRIVER[format], file]);
  execFileSync(q!, ["compare", "-q", "-f", DRIVER[format], "-F", "raw", file, reference]);
}

/** Bytes a file takes on disk, holes left out. */
const allocated = (file: string) => fs.statSync(file).blocks * 512;

const SERVER = `mutation ($i: CreateServerInput!) { createServer(input: $i) { server { id status disks { nodes { id type sizeBytes device } } } job { id } } }`;

describe("a sparse 10 GiB QCOW2 cloud image, end to end", () => {
  const size = 10 * GiB;
  // A few hundred MiB: random and text, at the start, across 2^31 and 2^32, and at the very end.
  const text = Buffer.from("root:x:0:0:root:/root:/bin/sh\n".repeat(2_300_000)).subarray(0, 64 * MiB);
  const pieces: Piece[] = [
    { offset: 0, data: bytes(96 * MiB, 1) },
    { offset: 2 * GiB - 16 * MiB, data: Buffer.concat([text.subarray(0, 16 * MiB), bytes(16 * MiB, 2)]) },
    { offset: 4 * GiB - 32 * MiB, data: bytes(64 * MiB, 3) },
    { offset: 7 * GiB, data: text },
    { offset: size - 32 * MiB, data: bytes(32 * MiB, 4) },
  ];
  const checksum = checksumOfPieces(size, pieces);
  let reference: string;
  let imageId: string;

  it(
    "imports the file: the image has its size and the checksum of its bytes",
    async () => {
      if (!q || !curl) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
      reference = path.join(work.dir, "cloud.raw");
      sparseFile(reference, size, pieces);
      const qcow2 = path.join(work.dir, "cloud.qcow2");
      execFileSync(q, ["convert", "-f", "raw", "-O", "qcow2", reference, qcow2]);
      const { image, jobId } = await importFile(qcow2);
      expect(image).toMatchObject({ status: "ACTIVE", virtualSizeBytes: size, minDiskBytes: size, checksum, error: null });
      // The job moved the file's data, block by block, and nothing of its holes.
      expect(await visited(jobId)).toBeLessThanOrEqual(pieces.reduce((n, p) => n + p.data.length, 0) / BLOCK);
      imageId = image.id;
      fs.rmSync(qcow2);
    },
    LONG,
  );

  it(
    "becomes a server, which is backed up, damaged, restored, and exported in every format",
    async () => {
      if (!q || !curl) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
      const made = (await svc.ok(SERVER, { i: { name: "cloud-1", vcpus: 2, memoryMiB: 2048, imageId, hydrate: true } })).createServer;
      await succeed(svc, made.job.id);
      const sys = made.server.disks.nodes.find((d: any) => d.type === "SYSTEM");
      expect(sys.sizeBytes).toBe(size);
      // Reads past 2^32 come back as the file holds them.
      const far = await readDisk(svc, sys.id, [size - 32 * MiB + 4096, size - 32 * MiB + 8191]);
      expect(far.equals(pieces[4].data.subarray(4096, 8192))).toBe(true);
      const across = await readDisk(svc, sys.id, [4 * GiB - 4096, 4 * GiB + 4095]);
      expect(across.equals(pieces[2].data.subarray(32 * MiB - 4096, 32 * MiB + 4096))).toBe(true);

      const b = (await svc.ok(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: made.server.id })).createBackup;
      await succeed(svc, b.job.id);
      const child = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status children { nodes { id disk { id } } } } } }`, { id: b.backup.id })).node;
      expect(child.status).toBe("AVAILABLE");

      // Damage across 2^32, then restore the server backup onto it.
      await writeDisk(svc, sys.id, bytes(8 * MiB, 99), 4 * GiB - 4 * MiB);
      const restore = (await svc.ok(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b: b.backup.id })).restoreBackup;
      await succeed(svc, restore.job.id);
      // Only what differs is written back: the 8 MiB, not the disk.
      expect(await visited(restore.job.id)).toBeLessThanOrEqual((8 * MiB) / BLOCK + 16);

      // The server backup's system disk also restores onto another disk, through the server backup.
      const blank = (await svc.ok(`mutation ($s: SafeInt!) { createDisk(input: { name: "copy", sizeBytes: $s }) { disk { id } } }`, { s: size })).createDisk.disk.id;
      const mapped = (
        await svc.ok(`mutation ($b: ID!, $c: ID!, $d: ID!) { restoreBackup(input: { backupId: $b, powerOn: false, mappings: [{ backupId: $c, diskId: $d }] }) { job { id } } }`, {
          b: b.backup.id,
          c: child.children.nodes.find((c: any) => c.disk.id === sys.id).id,
          d: blank,
        })
      ).restoreBackup;
      await succeed(svc, mapped.job.id);
      expect(await visited(mapped.job.id)).toBeLessThanOrEqual(pieces.reduce((n, p) => n + p.data.length, 0) / BLOCK);

      for (const diskId of [sys.id, blank]) {
        const { image } = await imageOf({ name: "check", diskId });
        expect(image.checksum).toBe(checksum);
        for (const format of ["RAW", "QCOW2", "VMDK", "VHD"]) {
          const { exp, file } = await exportTo(image.id, format);
          expect(exp).toMatchObject({ status: "READY", format, error: null });
          expect(exp.sizeBytes).toBe(fs.statSync(file).size);
          compareWithQemu(format, file, reference);
          if (format === "RAW") {
            expect(exp.sizeBytes).toBe(size);
            // Sparse: holes where the image has none.
            expect(allocated(file)).toBeLessThan(400 * MiB);
            expect(exp.sha256).toBeNull();
          } else {
            // Only data: never runs of zeros.
            expect(exp.sizeBytes).toBeLessThan(400 * MiB);
            expect(exp.sha256).toMatch(/^[0-9a-f]{64}$/);
          }
          // A Range read past 2^32 of the download costs no more than its bytes.
          if (format === "RAW") {
            const res = await svc.http(exp.downloadUrl, { headers: { range: `bytes=${7 * GiB}-${7 * GiB + 65535}` } });
            expect(res.status).toBe(206);
            expect(Buffer.from(await res.arrayBuffer()).equals(text.subarray(0, 65536))).toBe(true);
            // The download names its map, which says where the data is: exactly the pieces, holes between.
            const link = /<([^>]+)>; rel="describedby"/.exec(res.headers.get("link") ?? "");
            expect(link).not.toBeNull();
            const map = (await (await svc.http(link![1])).json()) as { start: number; length: number; data: boolean }[];
            expect(map.filter((e) => e.data).map((e) => [e.start, e.length])).toEqual(pieces.map((p) => [p.offset, p.data.length]));
            expect(map.reduce((n, e) => n + e.length, 0)).toBe(size);
          }
          fs.rmSync(file);
        }
      }
    },
    LONG,
  );
});

describe("a 1 TiB disk costs what it holds", () => {
  it(
    "images an empty 1 TiB disk without visiting a block",
    async () => {
      const disk = (await svc.ok(`mutation { createDisk(input: { name: "huge", sizeBytes: ${TiB} }) { disk { id } } }`)).createDisk.disk.id;
      const { image, jobId } = await imageOf({ name: "empty-huge", diskId: disk });
      expect(image).toMatchObject({ status: "ACTIVE", virtualSizeBytes: TiB, checksum: checksumOfPieces(TiB, []) });
      expect(await visited(jobId)).toBe(0);
    },
    LONG,
  );

  it(
    "images, backs up, verifies, restores and exports a server of two 1 TiB disks holding 8 MiB by the blocks written",
    async () => {
      if (!q || !curl) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
      const made = (await svc.ok(SERVER, { i: { name: "huge-1", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: TiB, dataDisks: [{ sizeBytes: TiB }] } })).createServer;
      const [sys, data] = [made.server.disks.nodes.find((d: any) => d.type === "SYSTEM"), made.server.disks.nodes.find((d: any) => d.type === "DATA")];
      const sysPieces = [
        { offset: 0, data: bytes(2 * MiB, 7) },
        { offset: TiB - 2 * MiB, data: bytes(2 * MiB, 8) },
      ];
      for (const p of sysPieces) await writeDisk(svc, sys.id, p.data, p.offset);
      await writeDisk(svc, data.id, bytes(4 * MiB, 9), 600 * GiB);
      const written = (8 * MiB) / BLOCK;

      // A FULL_SERVER image backs the server up first, then images the backup.
      const full = (
        await svc.ok(`mutation ($s: ID!) { createImage(input: { name: "huge-full", serverId: $s, type: FULL_SERVER }) { image { id sourceBackup { id } } job { id } } }`, { s: made.server.id })
      ).createImage;
      await succeed(svc, full.job.id);
      const [backupJob] = (await svc.ok(`query ($s: ID!) { jobs(first: 5, filter: { types: [BACKUP], resourceId: $s }) { nodes { id } } }`, { s: made.server.id })).jobs.nodes;
      await succeed(svc, backupJob.id);
      expect(await visited(backupJob.id)).toBeLessThanOrEqual(written);
      expect(await visited(full.job.id)).toBeLessThanOrEqual(2 * written);
      expect((await svc.ok(IMAGE, { id: full.image.id })).node).toMatchObject({ status: "ACTIVE", type: "FULL_SERVER", virtualSizeBytes: TiB });

      const backupId = full.image.sourceBackup.id;
      const verify = (await svc.ok(`mutation ($b: ID!) { verifyBackup(input: { id: $b }) { job { id } } }`, { b: backupId })).verifyBackup;
      const verified = await succeed(svc, verify.job.id);
      expect(verified.bytesTotal).toBe(8 * MiB);
      expect(await visited(verify.job.id)).toBeLessThanOrEqual(written);

      // The data disk backed up on its own: an incremental on the server backup's, with nothing changed.
      const own = (await svc.ok(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: data.id })).createBackup;
      await succeed(svc, own.job.id);
      expect(await visited(own.job.id)).toBe(0);
      // A new 1 TiB disk from it, through its chain, hydrated: the work is the data's, and the system disk restored in place.
      const copy = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "huge-copy", backupId: $b, hydrate: true }) { disk { id sizeBytes } job { id } } }`, { b: own.backup.id })).createDisk;
      const copied = await succeed(svc, copy.job.id);
      expect(copied.bytesTotal).toBe(4 * MiB);
      expect(await visited(copy.job.id)).toBeLessThanOrEqual((4 * MiB) / BLOCK);
      expect((await readDisk(svc, copy.disk.id, [600 * GiB, 600 * GiB + 4095])).equals(bytes(4 * MiB, 9).subarray(0, 4096))).toBe(true);

      await writeDisk(svc, sys.id, bytes(MiB, 10), 300 * GiB);
      const restore = (await svc.ok(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b: backupId })).restoreBackup;
      await succeed(svc, restore.job.id);
      expect(await visited(restore.job.id)).toBeLessThanOrEqual(2 * written);
      expect((await readDisk(svc, sys.id, [300 * GiB, 300 * GiB + 4095])).every((b) => b === 0)).toBe(true);

      // The system disk as an image, exported in every format and imported back from each file.
      const reference = path.join(work.dir, "huge.raw");
      sparseFile(reference, TiB, sysPieces);
      const { image } = await imageOf({ name: "huge-sys", diskId: sys.id });
      expect(image.checksum).toBe(checksumOfPieces(TiB, sysPieces));
      for (const format of ["RAW", "QCOW2", "VMDK", "VHD"]) {
        const { exp, file, jobId } = await exportTo(image.id, format);
        expect(await visited(jobId)).toBeLessThanOrEqual((3 * (4 * MiB)) / BLOCK);
        // qemu-img takes about 40 s to compare a 1 TiB streamOptimized VMDK (it walks every
        // grain table); that one is checked by qemu-img check and by importing it back below.
        if (format === "VMDK") execFileSync(q, ["check", "-q", "-f", "vmdk", file]);
        else compareWithQemu(format, file, reference);
        expect(allocated(file)).toBeLessThan(64 * MiB);
        expect(exp.sizeBytes).toBe(fs.statSync(file).size);
        if (format !== "RAW") {
          const back = await importFile(file);
          expect(back.image).toMatchObject({ status: "ACTIVE", virtualSizeBytes: TiB, checksum: image.checksum });
          expect(await visited(back.jobId)).toBeLessThanOrEqual((4 * MiB) / BLOCK);
        }
        fs.rmSync(file);
      }
      fs.rmSync(reference);
    },
    LONG,
  );
});

describe("files and offsets past 2^31 and 2^32 bytes", () => {
  const size = 4 * GiB + 4 * MiB;
  const pieces: Piece[] = [
    { offset: 0, data: bytes(MiB, 20) },
    { offset: 2 * GiB - BLOCK, data: bytes(2 * BLOCK, 21) },
    { offset: 4 * GiB - BLOCK, data: bytes(2 * BLOCK, 22) },
    { offset: size - MiB, data: bytes(MiB, 23) },
  ];

  it(
    "imports RAW, QCOW2 and fixed VHD files larger than 4 GiB with data past 2^32 in the file",
    async () => {
      if (!q || !curl) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
      const reference = path.join(work.dir, "big.raw");
      sparseFile(reference, size, pieces);
      const checksum = checksumOfPieces(size, pieces);
      const qcow2 = path.join(work.dir, "big.qcow2");
      // Metadata preallocation lays every cluster out in the file: data past 2^32 of the disk sits past 2^32 of the file.
      execFileSync(q, ["convert", "-f", "raw", "-O", "qcow2", "-o", "preallocation=metadata", reference, qcow2]);
      const vhd = path.join(work.dir, "big.vhd");
      execFileSync(q, ["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on", reference, vhd]);
      for (const file of [reference, qcow2, vhd]) {
        expect(fs.statSync(file).size).toBeGreaterThan(2 ** 32);
        const { image } = await importFile(file, "DATA_DISK");
        expect({ file: path.basename(file), ...image }).toMatchObject({ file: path.basename(file), status: "ACTIVE", virtualSizeBytes: size, checksum });
        if (file !== reference) fs.rmSync(file);
      }
      const { image } = await importFile(reference, "DATA_DISK");
      for (const format of ["RAW", "QCOW2", "VMDK", "VHD"]) {
        const { file } = await exportTo(image.id, format);
        compareWithQemu(format, file, reference);
        fs.rmSync(file);
      }
      fs.rmSync(reference);
    },
    LONG,
  );
});

describe("progress and cancellation", () => {
  it(
    "reports bytesTotal up front and several events a second, and stops within a second of cancelJob",
    async () => {
      if (!q || !curl) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
      // 320 MiB of random data spread over a 64 GiB disk: long empty ranges between the pieces.
      const size = 64 * GiB;
      const pieces = Array.from({ length: 10 }, (_, k) => ({ offset: k * 6 * GiB, data: bytes(32 * MiB, 30 + k) }));
      const reference = path.join(work.dir, "spread.raw");
      sparseFile(reference, size, pieces);
      const qcow2 = path.join(work.dir, "spread.qcow2");
      execFileSync(q, ["convert", "-f", "raw", "-O", "qcow2", reference, qcow2]);
      fs.rmSync(reference);
      // An import consumes its upload: each run gets its own.
      const start = async () =>
        (await svc.ok(`mutation ($u: String!) { importImage(input: { name: "spread", uploadId: $u, type: DATA_DISK }) { job { id bytesTotal } } }`, { u: (await uploadFile(qcow2)).id })).importImage
          .job;

      // Watched from outside, as a client polls: the numbers move while the job runs.
      const job = await start();
      expect(job.bytesTotal).toBeGreaterThanOrEqual(320 * MiB);
      const seen: { at: number; done: number }[] = [];
      for (;;) {
        const j = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Job { status bytesDone bytesTotal } } }`, { id: job.id })).node;
        if (j.status === "RUNNING" && (!seen.length || seen[seen.length - 1].done !== j.bytesDone)) seen.push({ at: Date.now(), done: j.bytesDone });
        if (!["QUEUED", "RUNNING"].includes(j.status)) {
          expect(j.status).toBe("SUCCEEDED");
          break;
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      const span = (seen[seen.length - 1].at - seen[0].at) / 1000;
      expect(seen.length).toBeGreaterThanOrEqual(3);
      expect(seen.length / Math.max(span, 0.2)).toBeGreaterThanOrEqual(2);

      // The same import again, cancelled as soon as it has started to move bytes.
      const again = await start();
      for (;;) {
        const j = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Job { status bytesDone } } }`, { id: again.id })).node;
        if (j.status === "RUNNING" && j.bytesDone > 0) break;
        if (!["QUEUED", "RUNNING"].includes(j.status)) throw new Error(`the import ended ${j.status} before it could be cancelled`);
        await new Promise((r) => setTimeout(r, 10));
      }
      const asked = Date.now();
      await svc.ok(`mutation ($id: ID!) { cancelJob(input: { id: $id }) { job { id } } }`, { id: again.id });
      const ended = await waitJob(svc, again.id);
      expect(ended.status).toBe("CANCELLED");
      expect(Date.now() - asked).toBeLessThan(1000);
      fs.rmSync(qcow2);
    },
    LONG,
  );
});
