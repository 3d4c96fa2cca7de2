/**
 * Restores. restoreBackup is instant and all-or-nothing: in one transaction each
 * target disk becomes a clone of its disk backup, keeping only its own blocks that
 * already hold the backup's bytes, so the disk reads as the backup when the call
 * returns and nothing is copied; with `hydrate` a job copies the rest from the vault
 * while the disk is in use. A damaged chunk fails the hydration, marks the backup
 * ERROR and leaves the disk in use. Restores queued before restores were instant
 * (a staged copy, planned in the job) still stage what they write and change the
 * disk in one commit at their end: one that meets a damaged chunk, is cancelled or
 * loses its job leaves the disk exactly as it was (bytes, used bytes, block versions).
 */
import fs from "node:fs";
import path from "node:path";
import { FailureCode, type JobOf, type RestorePlan } from "../../src/domain/jobs";
import { DiskStatus, Job, JobStatus, JobType } from "../../src/entities";
import { RestoreHandler } from "../../src/jobs/handlers/restore.handler";
import { silentLogger } from "../../src/logger";
import { DiskReplacedError, segmentKey } from "../../src/storage/volume-store";
import { toGlobalId } from "../../src/services/global-id";
import { backupNow, BLOCK, bytes, createDisk, readDisk, restoreNow, sha, waitJob, writeDisk } from "../helpers/data";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

jest.setTimeout(180_000);

let svc: TestService;
/** What the service warned of, to see a job stop when it lost its claim. */
const warnings: { msg: string; fields?: Record<string, unknown> }[] = [];
beforeAll(async () => {
  svc = await startTestService({}, {}, { ...silentLogger, warn: (msg, fields) => void warnings.push({ msg, fields }) });
});
afterAll(async () => {
  await svc?.stop();
});

const uuidOf = (globalId: string) => Buffer.from(globalId, "base64url").toString().split(":")[1];
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Everything about a disk a restore could change: its bytes, used bytes, status, write version and block map. */
async function state(disk: string, ranges?: [number, number][]) {
  const [row] = await svc.ds.query(`SELECT status, used_bytes, write_version FROM disks WHERE id = $1`, [uuidOf(disk)]);
  const [{ digest }] = await svc.ds.query(
    `SELECT encode(sha256(coalesce(string_agg(int8send(block_index) || coalesce(hash, ''::bytea) || int8send(version) || coalesce(int8send(segment_offset), ''::bytea) || convert_to(coalesce(segment_id::text, ''), 'UTF8'), ''::bytea ORDER BY block_index), ''::bytea)), 'hex') AS digest
       FROM disk_blocks WHERE disk_id = $1`,
    [uuidOf(disk)],
  );
  const data = ranges ? await Promise.all(ranges.map((r) => readDisk(svc, disk, r).then(sha))) : [sha(await readDisk(svc, disk))];
  const { node } = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Disk { status usedBytes } } }`, { id: disk });
  return { data, status: row.status, usedBytes: Number(row.used_bytes), writeVersion: Number(row.write_version), blocks: digest, api: node };
}

/** Overwrites bytes inside the stored chunk of a backup's block, in its pack file. */
async function corruptChunk(backupId: string, blockIndex: number) {
  const [loc] = await svc.ds.query(`SELECT c.pack_id, c.pack_offset, c.stored_size FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash WHERE bb.backup_id = $1 AND bb.block_index = $2`, [
    uuidOf(backupId),
    blockIndex,
  ]);
  const file = path.join(svc.dataDir, "blobs", "vault", svc.projectIds.alpha, "packs", loc.pack_id.slice(0, 2), loc.pack_id);
  const fd = fs.openSync(file, "r+");
  fs.writeSync(fd, Buffer.from("CORRUPT!"), 0, 8, Number(loc.pack_offset) + 100);
  fs.closeSync(fd);
}

const deltaRows = async (backupId: string) => Number((await svc.ds.query(`SELECT count(*) AS n FROM backup_blocks WHERE backup_id = $1`, [uuidOf(backupId)]))[0].n);
const staged = async (jobId: string) => Number((await svc.ds.query(`SELECT count(*) AS n FROM staged_blocks WHERE job_id = $1`, [uuidOf(jobId)]))[0].n);
const backupRow = async (backupId: string) => (await svc.ds.query(`SELECT status, error_code, error FROM backups WHERE id = $1`, [uuidOf(backupId)]))[0];
/** Segments of a disk no block of it points at: garbage once nothing else pins them. */
const unreferenced = async (disk: string): Promise<{ id: string }[]> =>
  svc.ds.query(`SELECT s.id FROM volume_segments s WHERE s.disk_id = $1 AND NOT EXISTS (SELECT 1 FROM disk_blocks b WHERE b.segment_id = s.id)`, [uuidOf(disk)]);
const segmentFile = (disk: string, segment: string) => path.join(svc.dataDir, "blobs", segmentKey(uuidOf(disk), segment));
const GRACE = 60_000;

async function startRestore(input: Record<string, unknown>): Promise<string> {
  return (await svc.ok(`mutation ($i: RestoreBackupInput!) { restoreBackup(input: $i) { job { id } } }`, { i: input })).restoreBackup.job.id;
}

/**
 * A restore as queued before restores were instant: a RESTORE job with a plan (a staged
 * copy), its disk and backup RESTORING until it ends, as the service queued it then.
 */
async function legacyRestore(backup: string, disk: string): Promise<string> {
  const [backupId, diskId] = [uuidOf(backup), uuidOf(disk)];
  const job = await svc.ds.transaction(async (em) => {
    const [{ status }]: { status: DiskStatus }[] = await em.query(`SELECT status FROM disks WHERE id = $1`, [diskId]);
    await em.query(`UPDATE disks SET status = 'RESTORING' WHERE id = $1`, [diskId]);
    await em.query(`UPDATE backups SET status = 'RESTORING' WHERE id = $1`, [backupId]);
    const plan: RestorePlan = { targets: [{ backupId, diskId }], serverId: null, powerOn: false, diskStatus: { [diskId]: status }, diskStatusBefore: { [diskId]: status } };
    return svc.services.queue.add(em, svc.projectIds.alpha, { type: JobType.RESTORE, backupId, diskId, serverId: null, payload: { plan } });
  });
  await svc.services.queue.announce(job);
  return toGlobalId("Job", job.id);
}

/** A 16 MiB disk holding 8 MiB when backed up (as `backupName`), then changed: half of what the backup holds, and 2 MiB where it holds none. */
async function changedSinceBackup(name: string, backupName: string, seed: number): Promise<{ disk: string; b: string }> {
  const disk = await createDisk(svc, name, 16 * MiB);
  await writeDisk(svc, disk, bytes(8 * MiB, seed));
  const b = await backupNow(svc, disk, backupName);
  await writeDisk(svc, disk, bytes(4 * MiB, seed + 1));
  await writeDisk(svc, disk, bytes(2 * MiB, seed + 2), 12 * MiB);
  return { disk, b };
}

/** 64 KiB blocks that are all alike but not zeros: many blocks of data that cost the vault one chunk. */
const alike = (n: number) => Buffer.alloc(n, 0x5a);

describe("a restore whose hydration meets a damaged chunk", () => {
  it("restores at once, then fails the hydration with CORRUPT_CHUNK and marks the backup ERROR; the disk stays in use and reads the backup but for that block", async () => {
    const { disk, b } = await changedSinceBackup("damaged-hydrated", "to-damage-hydrated", 5);
    await corruptChunk(b, 30);

    const jobId = await startRestore({ backupId: b, hydrate: true });
    // Restored when the call returned: what it reads never touched the damaged chunk.
    expect((await readDisk(svc, disk, [0, 30 * BLOCK - 1])).equals(bytes(8 * MiB, 5).subarray(0, 30 * BLOCK))).toBe(true);
    expect((await readDisk(svc, disk, [12 * MiB, 14 * MiB - 1])).equals(Buffer.alloc(2 * MiB))).toBe(true);
    const job = await waitJob(svc, jobId);
    expect(job.status).toBe("FAILED");
    expect(job.error.code).toBe("CORRUPT_CHUNK");
    expect(job.error.message).toMatch(/^backup to-damage-hydrated is damaged \(chunk [0-9a-f]{16}… is corrupt/);
    expect(job.error.message).not.toMatch(/\//); // no paths
    expect(await backupRow(b)).toEqual({ status: "ERROR", error_code: "CORRUPT_CHUNK", error: job.error.message });

    const after = await state(disk, [[31 * BLOCK, 8 * MiB - 1]]);
    expect(after.status).toBe("AVAILABLE");
    expect(after.data[0]).toBe(sha(bytes(8 * MiB, 5).subarray(31 * BLOCK)));
    const read = await svc.http(`/v1/disks/${disk}/data`, { headers: { range: `bytes=${30 * BLOCK}-${30 * BLOCK + 99}` } });
    expect(read.status).toBe(500);
    expect(((await read.json()) as { error: { code: string } }).error.code).toBe("CORRUPT_CHUNK");
    // Writing the block makes it whole; a damaged backup is not restored again.
    await writeDisk(svc, disk, bytes(BLOCK, 8), 30 * BLOCK);
    expect(sha(await readDisk(svc, disk, [30 * BLOCK, 31 * BLOCK - 1]))).toBe(sha(bytes(BLOCK, 8)));
    const again = await svc.gql(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b });
    expect(again.errors?.[0]?.extensions?.code).toBe("FAILED_PRECONDITION");
  });

  it("restores every disk of a server at once, the server ACTIVE when the call returns; a damaged disk backup fails the hydration and its server backup does not restore again", async () => {
    const server = (
      await svc.ok(`mutation { createServer(input: { name: "two-disks", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${4 * MiB}, dataDisks: [{ sizeBytes: ${4 * MiB} }] }) {
        server { id disks { nodes { id } } } } }`)
    ).createServer.server;
    const disks: string[] = server.disks.nodes.map((d: { id: string }) => d.id);
    for (const [i, d] of disks.entries()) await writeDisk(svc, d, bytes(2 * MiB, 70 + i));
    const b = await backupNow(svc, server.id, "two-disks-backup");
    for (const [i, d] of disks.entries()) await writeDisk(svc, d, bytes(MiB, 80 + i)); // the damaged block among what differs
    await svc.ok(`mutation ($id: ID!) { stopServer(input: { id: $id }) { server { status } } }`, { id: server.id });
    const [child] = await svc.ds.query(`SELECT id FROM backups WHERE parent_id = $1 AND disk_id = $2`, [uuidOf(b), uuidOf(disks[1])]);
    const childId = toGlobalId("Backup", child.id);
    await corruptChunk(childId, 3);

    const jobId = await startRestore({ backupId: b, hydrate: true });
    const { node } = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { status } } }`, { id: server.id });
    expect(node.status).toBe("ACTIVE");
    expect(sha(await readDisk(svc, disks[0]))).toBe(sha(Buffer.concat([bytes(2 * MiB, 70), Buffer.alloc(2 * MiB)])));
    expect(sha(await readDisk(svc, disks[1], [4 * BLOCK, 4 * MiB - 1]))).toBe(sha(Buffer.concat([bytes(2 * MiB, 71).subarray(4 * BLOCK), Buffer.alloc(2 * MiB)])));

    const job = await waitJob(svc, jobId);
    expect(job.error?.code).toBe("CORRUPT_CHUNK");
    expect(job.error.message).toMatch(/^backup two-disks-backup-vdb is damaged/);
    expect((await backupRow(childId)).status).toBe("ERROR");
    const again = await svc.gql(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b });
    expect(again.errors?.[0]?.extensions?.code).toBe("FAILED_PRECONDITION");
    expect(again.errors?.[0]?.message).toMatch(/two-disks-backup-vdb is damaged/);
  });

  it("a missing pack fails the same way: a disk made from the backup stays in use, its hydration fails and the backup is marked ERROR", async () => {
    const disk = await createDisk(svc, "lost-pack", 4 * MiB);
    await writeDisk(svc, disk, bytes(4 * MiB, 4));
    const b = await backupNow(svc, disk, "lost");
    const packs: { pack_id: string }[] = await svc.ds.query(`SELECT DISTINCT c.pack_id FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash WHERE bb.backup_id = $1`, [uuidOf(b)]);
    for (const { pack_id } of packs) fs.rmSync(path.join(svc.dataDir, "blobs", "vault", svc.projectIds.alpha, "packs", pack_id.slice(0, 2), pack_id));
    const r = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "from-lost", backupId: $b, hydrate: true }) { disk { id } job { id } } }`, { b })).createDisk;
    const job = await waitJob(svc, r.job.id);
    expect(job.status).toBe("FAILED");
    expect(job.error.code).toBe("CORRUPT_CHUNK");
    expect(job.error.message).toMatch(/^backup lost is damaged \(chunk [0-9a-f]{16}… is missing/);
    expect(await backupRow(b)).toMatchObject({ status: "ERROR", error_code: "CORRUPT_CHUNK" });
    const [created] = await svc.ds.query(`SELECT status, used_bytes FROM disks WHERE id = $1`, [uuidOf(r.disk.id)]);
    expect(created).toEqual({ status: "AVAILABLE", used_bytes: String(4 * MiB) });
    // Nothing of it was hydrated, and reading it says why.
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM disk_blocks WHERE disk_id = $1`, [uuidOf(r.disk.id)]))[0].n)).toBe(0);
    const read = await svc.http(`/v1/disks/${r.disk.id}/data`, { headers: { range: "bytes=0-99" } });
    expect(read.status).toBe(500);
    expect(((await read.json()) as { error: { code: string } }).error.code).toBe("CORRUPT_CHUNK");
  });
});

describe("a restore queued before restores were instant", () => {
  it("one that meets a damaged chunk fails CORRUPT_CHUNK, marks the backup ERROR and leaves the changed original disk exactly as it was", async () => {
    const { disk, b } = await changedSinceBackup("damaged", "to-damage", 1);
    const pre = await backupNow(svc, disk);
    const before = await state(disk);
    expect(before.status).toBe("AVAILABLE");
    await corruptChunk(b, 30);

    const jobId = await legacyRestore(b, disk);
    const job = await waitJob(svc, jobId);
    expect(job.status).toBe("FAILED");
    expect(job.error.code).toBe("CORRUPT_CHUNK");
    expect(job.error.message).toMatch(/^backup to-damage is damaged \(chunk [0-9a-f]{16}… is corrupt/);
    expect(job.error.message).not.toMatch(/\//); // no paths
    expect(await backupRow(b)).toEqual({ status: "ERROR", error_code: "CORRUPT_CHUNK", error: job.error.message });
    const { node } = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status error } } }`, { id: b });
    expect(node).toEqual({ status: "ERROR", error: job.error.message });

    expect(await state(disk)).toEqual(before);
    expect(await staged(jobId)).toBe(0);
    // The next backup finds nothing changed since the one before the restore.
    const after = await backupNow(svc, disk);
    expect(await deltaRows(after)).toBe(0);
    expect((await backupRow(pre)).status).toBe("AVAILABLE");
    // A damaged backup is not restored again.
    const again = await svc.gql(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b });
    expect(again.errors?.[0]?.extensions?.code).toBe("FAILED_PRECONDITION");
  });

  it("cancelled, leaves the disk exactly as it was, though it had staged blocks, and its staged segments become garbage", async () => {
    // The backup holds 8 MiB at the end; since, the disk holds 256 MiB where the backup holds
    // nothing (the restore zeroes it: 4,096 blocks, staged on their own before any data).
    const disk = await createDisk(svc, "cancelled", 296 * MiB);
    await writeDisk(svc, disk, bytes(8 * MiB, 11), 288 * MiB);
    const b = await backupNow(svc, disk);
    await writeDisk(svc, disk, alike(256 * MiB));
    await writeDisk(svc, disk, bytes(8 * MiB, 12), 288 * MiB);
    await backupNow(svc, disk);
    await svc.storage.volumes.collectGarbage(GRACE);
    const before = await state(disk);
    expect(await unreferenced(disk)).toEqual([]);

    // No segment can be recorded while this transaction holds their table (SHARE: rows may still
    // point at it): the restore stages its zeros, then waits to record its data until the
    // cancellation has been seen.
    const hold = svc.ds.createQueryRunner();
    await hold.connect();
    await hold.startTransaction();
    let jobId: string;
    try {
      await hold.query(`LOCK TABLE volume_segments IN SHARE MODE`);
      jobId = await legacyRestore(b, disk);
      for (let i = 0; (await staged(jobId)) === 0; i++) {
        if (i > 1200) throw new Error("the restore staged nothing within a minute");
        await sleep(50);
      }
      expect(await staged(jobId)).toBe(4096);
      await svc.ok(`mutation ($id: ID!) { cancelJob(input: { id: $id }) { job { id } } }`, { id: jobId });
      // The runner hears of the cancellation from its heartbeat (every half second at most).
      await sleep(2000);
      expect((await waitJobStatus(jobId)).status).toBe("RUNNING");
    } finally {
      await hold.rollbackTransaction();
      await hold.release();
    }
    const job = await waitJob(svc, jobId);
    expect(job.status).toBe("CANCELLED");
    expect(await state(disk)).toEqual(before);
    expect(await staged(jobId)).toBe(0);
    expect((await backupRow(b)).status).toBe("AVAILABLE");

    // The data segment it recorded once the table was free is pinned by nothing now.
    const garbage = await unreferenced(disk);
    expect(garbage).toHaveLength(1);
    expect(fs.existsSync(segmentFile(disk, garbage[0].id))).toBe(true);
    await svc.storage.volumes.collectGarbage(GRACE);
    expect(await unreferenced(disk)).toEqual([]);
    expect(fs.existsSync(segmentFile(disk, garbage[0].id))).toBe(false);
    expect(await state(disk)).toEqual(before);
    const next = await backupNow(svc, disk);
    expect(await deltaRows(next)).toBe(0);

    // Run to its end, the same restore does what it should.
    await restoreNow(svc, { backupId: b });
    expect((await readDisk(svc, disk)).equals(Buffer.concat([Buffer.alloc(288 * MiB), bytes(8 * MiB, 11)]))).toBe(true);
  });

  it("whose process lost the job publishes nothing when it goes on: the disk stays as the process that failed the job left it, and what it staged is garbage", async () => {
    const disk = await createDisk(svc, "fenced", 8 * MiB);
    await writeDisk(svc, disk, bytes(4 * MiB, 61));
    const b = await backupNow(svc, disk);
    await writeDisk(svc, disk, bytes(4 * MiB, 62));
    await svc.storage.volumes.collectGarbage(GRACE);
    const before = await state(disk);

    // The restore is held before it records its segment, as a frozen process would be.
    const hold = svc.ds.createQueryRunner();
    await hold.connect();
    await hold.startTransaction();
    let jobId: string;
    try {
      await hold.query(`LOCK TABLE volume_segments IN SHARE MODE`);
      jobId = await legacyRestore(b, disk);
      const waiting = async () => Number((await svc.ds.query(`SELECT count(*) AS n FROM pg_locks WHERE relation = 'volume_segments'::regclass AND NOT granted`))[0].n);
      for (let i = 0; (await waiting()) === 0; i++) {
        if (i > 1200) throw new Error("the restore never reached its segment within a minute");
        await sleep(50);
      }
      // Meanwhile another process fails the job, as recovery does, and cleans up after it.
      const message = "the process running the job stopped before it finished";
      await svc.ds.query(`UPDATE jobs SET status = 'FAILED', finished_at = now(), error_code = 'INTERRUPTED', error_message = $2 WHERE id = $1`, [uuidOf(jobId), message]);
      const job = await svc.ds.getRepository(Job).findOneByOrFail({ id: uuidOf(jobId) });
      await new RestoreHandler(JobType.RESTORE, svc.ds, svc.storage.volumes, svc.storage.vault).cleanup(job as JobOf<JobType.RESTORE>, {
        status: JobStatus.FAILED,
        code: FailureCode.INTERRUPTED,
        message,
      });
    } finally {
      await hold.rollbackTransaction();
      await hold.release();
    }
    // The held process goes on, stages its segment, and its commit finds the job gone.
    for (let i = 0; !warnings.some((w) => w.msg.includes("lost its claim") && w.fields?.job === uuidOf(jobId)); i++) {
      if (i > 1200) throw new Error("the restore never noticed it lost the job");
      await sleep(50);
    }
    expect((await waitJob(svc, jobId)).error.code).toBe("INTERRUPTED");
    expect(await state(disk)).toEqual(before);
    expect((await backupRow(b)).status).toBe("AVAILABLE");
    expect(await staged(jobId)).toBeGreaterThan(0);
    const garbage = await unreferenced(disk);
    expect(garbage).toHaveLength(1);
    await svc.storage.volumes.collectGarbage(GRACE);
    expect(await staged(jobId)).toBe(0);
    expect(await unreferenced(disk)).toEqual([]);
    expect(fs.existsSync(segmentFile(disk, garbage[0].id))).toBe(false);
    expect(await state(disk)).toEqual(before);
  });
});

async function waitJobStatus(jobId: string): Promise<{ status: string }> {
  return (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Job { status } } }`, { id: jobId })).node;
}

describe("a successful restore", () => {
  const vaultChunks = async () => Number((await svc.ds.query(`SELECT count(*) AS n FROM vault_chunks`))[0].n);
  const hydration = async (disk: string) =>
    (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Disk { hydration { bytesInVault bytesLocal } } } }`, { id: disk })).node.hydration as { bytesInVault: number; bytesLocal: number };

  it("changes the disk in one write version when it is asked for, keeping its blocks that hold the backup's bytes; the next backup stores nothing new", async () => {
    const disk = await createDisk(svc, "restored", 16 * MiB);
    await writeDisk(svc, disk, bytes(12 * MiB, 21));
    const b = await backupNow(svc, disk);
    const image = await readDisk(svc, disk);
    await writeDisk(svc, disk, bytes(2 * MiB, 22), 2 * MiB); // 32 blocks that differ from the backup
    await writeDisk(svc, disk, bytes(MiB, 23), 14 * MiB); // 16 blocks it holds nothing in
    await backupNow(svc, disk);
    const before = await state(disk);

    const jobId = await startRestore({ backupId: b });
    const after = await state(disk);
    expect((await readDisk(svc, disk)).equals(image)).toBe(true);
    expect(after.writeVersion).toBe(before.writeVersion + 1);
    expect(after.usedBytes).toBe(12 * MiB);
    expect(after.api).toEqual({ status: "AVAILABLE", usedBytes: 12 * MiB });
    // Its 160 blocks that hold what the backup holds stay; the 32 that differ read from the vault.
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM disk_blocks WHERE disk_id = $1`, [uuidOf(disk)]))[0].n)).toBe(160);
    expect(await hydration(disk)).toEqual({ bytesInVault: 2 * MiB, bytesLocal: 10 * MiB });
    const job = await waitJob(svc, jobId);
    expect(job).toMatchObject({ status: "SUCCEEDED", bytesTotal: 0 });

    // The first backup after it names every block (its tracked changes say nothing of the restore)
    // and stores nothing the vault did not hold; the one after that is incremental again.
    const chunks = await vaultChunks();
    const full = await backupNow(svc, disk);
    expect(await deltaRows(full)).toBe(192);
    expect(await vaultChunks()).toBe(chunks);
    await writeDisk(svc, disk, bytes(BLOCK, 24), 5 * BLOCK);
    const inc = await backupNow(svc, disk);
    expect(await deltaRows(inc)).toBe(1);
    const expected = Buffer.from(image);
    bytes(BLOCK, 24).copy(expected, 5 * BLOCK);

    // Restored onto an empty disk and hydrated: every block is copied, and the disk is a clone no more.
    const copy = await createDisk(svc, "restored-copy", 16 * MiB);
    const hydrated = await restoreNow(svc, { backupId: inc, targetDiskId: copy, hydrate: true });
    expect(hydrated.bytesTotal).toBe(12 * MiB);
    expect(await hydration(copy)).toEqual({ bytesInVault: 0, bytesLocal: 12 * MiB });
    expect((await svc.ds.query(`SELECT clone_backup_id FROM disks WHERE id = $1`, [uuidOf(copy)]))[0].clone_backup_id).toBeNull();
    expect((await readDisk(svc, copy)).equals(expected)).toBe(true);
  });

  it("restores a 1 TiB sparse disk with statements that do not grow with it, and hydrates only the blocks that differ", async () => {
    const TiB = 1024 * GiB;
    const disk = await createDisk(svc, "sparse", TiB);
    await writeDisk(svc, disk, bytes(MiB, 31));
    await writeDisk(svc, disk, bytes(MiB, 32), TiB - MiB);
    const b = await backupNow(svc, disk);
    await writeDisk(svc, disk, bytes(MiB, 33));
    await writeDisk(svc, disk, bytes(MiB, 34), 512 * GiB);
    const { result: jobId, count } = await svc.countQueries(() => startRestore({ backupId: b, hydrate: true }));
    expect(count).toBeLessThan(30);
    expect(sha(await readDisk(svc, disk, [0, MiB - 1]))).toBe(sha(bytes(MiB, 31)));
    expect((await readDisk(svc, disk, [512 * GiB, 512 * GiB + MiB - 1])).equals(Buffer.alloc(MiB))).toBe(true);
    expect(sha(await readDisk(svc, disk, [TiB - MiB, TiB - 1]))).toBe(sha(bytes(MiB, 32)));
    expect((await state(disk, [[0, 0]])).usedBytes).toBe(2 * MiB);
    const job = await waitJob(svc, jobId);
    expect(job.status).toBe("SUCCEEDED");
    const [{ blocks_visited: visited }] = await svc.ds.query(`SELECT blocks_visited FROM jobs WHERE id = $1`, [uuidOf(jobId)]);
    expect(Number(visited)).toBe(16); // the first MiB; the last one held the backup's bytes already
    expect(sha(await readDisk(svc, disk, [0, MiB - 1]))).toBe(sha(bytes(MiB, 31)));
  });

  it("refuses a hydration's blocks looked up before a restore, and says when the disk is gone", async () => {
    const source = await createDisk(svc, "fill-source", 4 * MiB);
    await writeDisk(svc, source, bytes(MiB, 36));
    const b = await backupNow(svc, source);
    const clone = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "fill-clone", backupId: $b }) { disk { id } } }`, { b })).createDisk.disk.id;
    const restoresOf = async () => Number((await svc.ds.query(`SELECT restores FROM disks WHERE id = $1`, [uuidOf(clone)]))[0].restores);
    const looked = await restoresOf();
    await restoreNow(svc, { backupId: b, targetDiskId: clone });
    expect(await restoresOf()).toBe(looked + 1);
    async function* block() {
      yield { index: 0, data: bytes(BLOCK, 37) };
    }
    const fill = (restores: number) => svc.storage.volumes.putBlocks(svc.projectIds.alpha, uuidOf(clone), block(), { fill: { restores } });
    await expect(fill(looked)).rejects.toMatchObject({ constructor: DiskReplacedError, gone: false });
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM disk_blocks WHERE disk_id = $1`, [uuidOf(clone)]))[0].n)).toBe(0);
    expect(sha(await readDisk(svc, clone, [0, MiB - 1]))).toBe(sha(bytes(MiB, 36)));
    const current = await restoresOf();
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: clone });
    await expect(fill(current)).rejects.toMatchObject({ constructor: DiskReplacedError, gone: true });
  });

  it("refuses while a target disk is being hydrated, and goes on after", async () => {
    const disk = await createDisk(svc, "busy-hydrating", 8 * MiB);
    await writeDisk(svc, disk, bytes(8 * MiB, 35));
    const b = await backupNow(svc, disk);
    const clone = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "busy-clone", backupId: $b }) { disk { id } } }`, { b })).createDisk.disk.id;
    // A hydration another process runs.
    const [{ id: queued }] = await svc.ds.query(
      `INSERT INTO jobs (project_id, type, status, disk_id, payload, worker_id, heartbeat_at, started_at) VALUES ($1, 'CREATE_DISK', 'RUNNING', $2, $3, 'elsewhere:1:test', now(), now()) RETURNING id`,
      [svc.projectIds.alpha, uuidOf(clone), { hydrate: [uuidOf(clone)] }],
    );
    const refused = await svc.gql(`mutation ($b: ID!, $d: ID!) { restoreBackup(input: { backupId: $b, targetDiskId: $d }) { job { id } } }`, { b, d: clone });
    expect(refused.errors?.[0]?.extensions?.code).toBe("CONFLICT");
    expect(refused.errors?.[0]?.message).toContain(toGlobalId("Job", queued));
    await svc.ds.query(`UPDATE jobs SET status = 'CANCELLED', finished_at = now() WHERE id = $1`, [queued]);
    await restoreNow(svc, { backupId: b, targetDiskId: clone });
    expect(sha(await readDisk(svc, clone))).toBe(sha(bytes(8 * MiB, 35)));
  });
});

describe("staged blocks and garbage collection", () => {
  /** A job of another process, RUNNING, for the store's staging. */
  async function runningJob(disk: string): Promise<string> {
    const [{ id }] = await svc.ds.query(
      `INSERT INTO jobs (project_id, type, status, disk_id, worker_id, heartbeat_at, started_at) VALUES ($1, 'RESTORE', 'RUNNING', $2, 'elsewhere:1:test', now(), now()) RETURNING id`,
      [svc.projectIds.alpha, uuidOf(disk)],
    );
    return id;
  }
  async function* blocks(seed: number) {
    for (let i = 0; i < 4; i++) yield { index: i, data: bytes(BLOCK, seed + i) };
    yield { index: 10, data: null };
  }
  const segmentsOf = async (jobId: string): Promise<string[]> =>
    (await svc.ds.query(`SELECT DISTINCT segment_id FROM staged_blocks WHERE job_id = $1 AND segment_id IS NOT NULL`, [jobId])).map((r: any) => r.segment_id);

  it("keeps staged segments while their job runs, and collects them once it ended without publishing", async () => {
    const volumes = svc.storage.volumes;
    const disk = await createDisk(svc, "staging", 4 * MiB);
    await writeDisk(svc, disk, bytes(11 * BLOCK, 41));
    const before = await state(disk);
    const jobId = await runningJob(disk);
    await volumes.putBlocks(svc.projectIds.alpha, uuidOf(disk), blocks(42), { stage: jobId });
    const [segment] = await segmentsOf(jobId);
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM staged_blocks WHERE job_id = $1`, [jobId]))[0].n)).toBe(5);
    expect(await state(disk)).toEqual(before);

    await volumes.collectGarbage(0);
    expect(fs.existsSync(segmentFile(disk, segment))).toBe(true);
    expect(await segmentsOf(jobId)).toEqual([segment]);

    // Its process died and nobody cleaned up: the rows pin nothing any more.
    await svc.ds.query(`UPDATE jobs SET status = 'FAILED', finished_at = now(), error_code = 'INTERRUPTED', error_message = 'gone' WHERE id = $1`, [jobId]);
    await volumes.collectGarbage(GRACE);
    expect(await segmentsOf(jobId)).toEqual([]);
    expect((await svc.ds.query(`SELECT 1 FROM volume_segments WHERE id = $1`, [segment])).length).toBe(0);
    expect(fs.existsSync(segmentFile(disk, segment))).toBe(false);
    expect(await state(disk)).toEqual(before);
  });

  it("publishes staged blocks in one transaction, zeroing and writing, and they stay once published", async () => {
    const volumes = svc.storage.volumes;
    const disk = await createDisk(svc, "publish", 4 * MiB);
    await writeDisk(svc, disk, bytes(11 * BLOCK, 51));
    const before = await state(disk);
    const jobId = await runningJob(disk);
    await volumes.putBlocks(svc.projectIds.alpha, uuidOf(disk), blocks(52), { stage: jobId });
    await svc.ds.transaction((em) => volumes.publish(em, uuidOf(disk), jobId));
    await svc.ds.query(`UPDATE jobs SET status = 'SUCCEEDED', finished_at = now() WHERE id = $1`, [jobId]);
    await volumes.collectGarbage(GRACE);

    const expected = Buffer.concat([...[0, 1, 2, 3].map((i) => bytes(BLOCK, 52 + i)), bytes(11 * BLOCK, 51).subarray(4 * BLOCK, 10 * BLOCK), Buffer.alloc(BLOCK)]);
    expect((await readDisk(svc, disk, [0, 11 * BLOCK - 1])).equals(expected)).toBe(true);
    const after = await state(disk);
    expect(after.writeVersion).toBe(before.writeVersion + 1);
    expect(after.usedBytes).toBe(10 * BLOCK);
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM staged_blocks WHERE job_id = $1`, [jobId]))[0].n)).toBe(0);
    expect(sha(await readDisk(svc, disk))).toBe(after.data[0]);
  });
});
