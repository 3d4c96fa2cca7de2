import { spawnSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import type { QueryRunner } from "typeorm";
import { silentLogger } from "../../src/logger";
import { collectAllGarbage, compactStorage } from "../../src/jobs";
import { exportKey, uploadKey } from "../../src/storage/uploads";
import { BLOCK_SIZE, type BlockWrite } from "../../src/storage/volume-store";
import { bytes, createDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService({ GC_GRACE_SECONDS: "0" });
});
afterAll(async () => {
  await svc?.stop();
});

/** A full collection, as the GC timer runs it, with the service's grace (0 here). */
const collect = () => collectAllGarbage(svc.ds, svc.storage, svc.config.gcGraceSeconds * 1000, silentLogger);

/** Holds writes to `table` (reads go on) until `release`: a writer reaching its index waits there. */
async function holdTable(table: string): Promise<{ release(): Promise<void> }> {
  const runner: QueryRunner = svc.ds.createQueryRunner();
  await runner.connect();
  await runner.startTransaction();
  await runner.query(`LOCK TABLE ${table} IN EXCLUSIVE MODE`);
  return {
    async release() {
      await runner.commitTransaction();
      await runner.release();
    },
  };
}

/** Resolves once some statement waits for a lock on `table`: the writer has its blob and is indexing it. */
async function waitForLockWaiter(table: string): Promise<void> {
  for (;;) {
    const [row] = await svc.ds.query(`SELECT 1 FROM pg_locks WHERE relation = $1::regclass AND NOT granted`, [table]);
    if (row) return;
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The files under a folder of the local blob store, temporary ones included. */
function filesUnder(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir, { recursive: true, withFileTypes: true })
    .filter((e) => e.isFile())
    .map((e) => e.name);
}

async function* blocksOf(data: Buffer, gate?: Promise<void>): AsyncGenerator<BlockWrite> {
  for (let i = 0; i < data.length / BLOCK_SIZE; i++) {
    if (i === 1 && gate) await gate;
    yield { index: i, data: data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE) };
  }
}

describe("a blob between being written and being indexed is never collected (GC_GRACE_SECONDS=0)", () => {
  it("keeps a volume segment whose commit waits, and the write completes with its bytes", async () => {
    const diskId = uuid(await createDisk(svc, "held-segment", 4 * MiB));
    const data = bytes(4 * BLOCK_SIZE, 11);
    const hold = await holdTable("volume_segments");
    let write: Promise<number>;
    try {
      write = svc.storage.volumes.putBlocks(svc.projectIds.alpha, diskId, blocksOf(data));
      write.catch(() => undefined);
      await waitForLockWaiter("volume_segments");
      const before = [];
      for await (const b of svc.storage.volumes.blobs.list(`volumes/${diskId}/`)) before.push(b.key);
      expect(before).toHaveLength(1);
      await collect();
      const after = [];
      for await (const b of svc.storage.volumes.blobs.list(`volumes/${diskId}/`)) after.push(b.key);
      expect(after).toEqual(before);
    } finally {
      await hold.release();
    }
    expect(await write).toBe(4);
    for (let i = 0; i < 4; i++) expect((await svc.storage.volumes.readBlock(diskId, i)).equals(data.subarray(i * BLOCK_SIZE, (i + 1) * BLOCK_SIZE))).toBe(true);
    expect(await svc.ds.query(`SELECT key FROM pending_blobs`)).toEqual([]);
  });

  it("keeps the unfinished file of a segment still being written, and the write completes", async () => {
    const diskId = uuid(await createDisk(svc, "slow-segment", 4 * MiB));
    const data = bytes(2 * BLOCK_SIZE, 12);
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const write = svc.storage.volumes.putBlocks(svc.projectIds.alpha, diskId, blocksOf(data, gate));
    write.catch(() => undefined);
    const dir = path.join(svc.dataDir, "blobs", "volumes", diskId);
    while (!filesUnder(dir).length) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 20)); // its file is older than the collection's cutoff
    await collect();
    expect(filesUnder(dir)).toHaveLength(1);
    open();
    expect(await write).toBe(2);
    expect((await svc.storage.volumes.readBlock(diskId, 1)).equals(data.subarray(BLOCK_SIZE))).toBe(true);
  });

  it("does not index a segment whose intent a collector took for abandoned: the write fails and the disk stays as it was", async () => {
    const diskId = uuid(await createDisk(svc, "abandoned-segment", 4 * MiB));
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const write = svc.storage.volumes.putBlocks(svc.projectIds.alpha, diskId, blocksOf(bytes(2 * BLOCK_SIZE, 13), gate));
    write.catch(() => undefined);
    // The segment's intent, once the write has recorded it (its first block is written, the second held by the gate).
    const intent = async (): Promise<string | undefined> => (await svc.ds.query(`SELECT key FROM pending_blobs WHERE starts_with(key, $1)`, [`volumes/${diskId}/`]))[0]?.key;
    let key: string | undefined;
    while (!(key = await intent())) await new Promise((r) => setTimeout(r, 20));
    await svc.ds.query(`DELETE FROM pending_blobs WHERE key = $1`, [key]); // what a collector does with an abandoned intent
    open();
    await expect(write).rejects.toThrow(`blob ${key} was taken for abandoned before it was indexed`);
    expect(await svc.ds.query(`SELECT 1 FROM volume_segments WHERE disk_id = $1`, [diskId])).toEqual([]);
    expect(await svc.ds.query(`SELECT 1 FROM disk_blocks WHERE disk_id = $1`, [diskId])).toEqual([]);
    const [{ used }] = await svc.ds.query(`SELECT used_bytes::bigint AS used FROM disks WHERE id = $1`, [diskId]);
    expect(Number(used)).toBe(0);
  });

  it("keeps a vault pack whose index waits, and its chunks read back", async () => {
    const project = svc.projectIds.alpha;
    const chunk = bytes(BLOCK_SIZE, 13);
    const hash = crypto.createHash("sha256").update(chunk).digest();
    const writer = svc.storage.vault.writer(project);
    await writer.addStored([{ hash, stored: chunk, raw: BLOCK_SIZE, compressed: false }]);
    const hold = await holdTable("vault_packs");
    let flushed: Promise<void>;
    try {
      flushed = writer.flush();
      flushed.catch(() => undefined);
      await waitForLockWaiter("vault_packs");
      await collect();
      const packs = [];
      for await (const b of svc.storage.vault.blobs.list(`vault/${project}/packs/`)) packs.push(b.key);
      expect(packs).toHaveLength(1);
    } finally {
      await hold.release();
    }
    await flushed;
    const read = await svc.storage.vault.readChunks(project, [hash], { sha256: true });
    expect(read.get(hash.toString("hex"))!.equals(chunk)).toBe(true);
  });

  it("takes an intent a crashed writer left a day ago for abandoned, and collects its blob", async () => {
    const diskId = uuid(await createDisk(svc, "crashed-writer", 4 * MiB));
    const key = `volumes/${diskId}/${crypto.randomUUID()}`;
    await svc.storage.volumes.blobs.put(key, bytes(BLOCK_SIZE, 14));
    await svc.ds.query(`INSERT INTO pending_blobs (key, owner, created_at) VALUES ($1, 'elsewhere:1', now() - interval '25 hours')`, [key]);
    await collect();
    expect(await svc.storage.volumes.blobs.stat(key)).toBeNull();
    expect(await svc.ds.query(`SELECT key FROM pending_blobs WHERE key = $1`, [key])).toEqual([]);
  });

  it("takes the intent of a process of this host that is gone for abandoned at once, and collects its blob", async () => {
    const diskId = uuid(await createDisk(svc, "dead-writer", 4 * MiB));
    const key = `volumes/${diskId}/${crypto.randomUUID()}`;
    await svc.storage.volumes.blobs.put(key, bytes(BLOCK_SIZE, 15));
    const gone = spawnSync(process.execPath, ["-e", ""]).pid!; // a process that ran and ended
    await svc.ds.query(`INSERT INTO pending_blobs (key, owner) VALUES ($1, $2)`, [key, `${os.hostname()}:${gone}`]);
    await collect();
    expect(await svc.storage.volumes.blobs.stat(key)).toBeNull();
    expect(await svc.ds.query(`SELECT key FROM pending_blobs WHERE key = $1`, [key])).toEqual([]);
  });
});

describe("with GC_INTERVAL_SECONDS=0 the compaction pass still reclaims", () => {
  const compactNow = () => compactStorage(svc.ds, svc.storage, silentLogger);

  it("expired uploads and exports", async () => {
    const project = svc.projectIds.beta;
    const upload = await svc.storage.uploads.put(project, Readable.from([bytes(BLOCK_SIZE, 21)]), 10 * MiB, 0);
    const [image] = await svc.ds.query(`INSERT INTO images (project_id, name, type, status, source, os_type) VALUES ($1, 'expiring', 'DATA_DISK', 'ACTIVE', 'IMPORT', 'OTHER') RETURNING id`, [
      project,
    ]);
    const [exp] = await svc.ds.query(
      `INSERT INTO image_exports (project_id, image_id, format, status, size_bytes, expires_at) VALUES ($1, $2, 'RAW', 'READY', $3, now() - interval '1 second') RETURNING id`,
      [project, image.id, BLOCK_SIZE],
    );
    await svc.storage.uploads.blobs.put(exportKey(project, exp.id), bytes(BLOCK_SIZE, 22));
    await compactNow();
    expect(await svc.storage.uploads.blobs.stat(uploadKey(project, upload.id))).toBeNull();
    expect(await svc.ds.query(`SELECT id FROM uploads WHERE id = $1`, [upload.id])).toEqual([]);
    expect(await svc.storage.uploads.blobs.stat(exportKey(project, exp.id))).toBeNull();
    expect((await svc.ds.query(`SELECT status FROM image_exports WHERE id = $1`, [exp.id]))[0].status).toBe("EXPIRED");
  });

  it("the segments a restore staged once its job ended without dropping them", async () => {
    const project = svc.projectIds.beta;
    const diskId = uuid(await createDisk(svc, "staged-left", 4 * MiB));
    const [job] = await svc.ds.query(`INSERT INTO jobs (project_id, type, status, started_at) VALUES ($1, 'RESTORE', 'RUNNING', now()) RETURNING id`, [project]);
    await svc.storage.volumes.putBlocks(project, diskId, blocksOf(bytes(2 * BLOCK_SIZE, 23)), { stage: job.id });
    const [segment] = await svc.ds.query(`SELECT id FROM volume_segments WHERE disk_id = $1`, [diskId]);
    await svc.ds.query(`UPDATE jobs SET status = 'FAILED', finished_at = now(), error_code = 'INTERNAL', error_message = 'lost' WHERE id = $1`, [job.id]);
    await compactNow();
    expect(await svc.ds.query(`SELECT 1 FROM staged_blocks WHERE job_id = $1`, [job.id])).toEqual([]);
    expect(await svc.ds.query(`SELECT 1 FROM volume_segments WHERE disk_id = $1`, [diskId])).toEqual([]);
    expect(await svc.storage.volumes.blobs.stat(`volumes/${diskId}/${segment.id}`)).toBeNull();
  });
});
