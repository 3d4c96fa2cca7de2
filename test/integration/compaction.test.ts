import fs from "node:fs";
import path from "node:path";
import { BlobNotFoundError } from "../../src/storage/blob-store";
import { compactVolumes } from "../../src/storage/compaction";
import { BLOCK_SIZE, type BlockWrite } from "../../src/storage/volume-store";
import { backup, backupNow, BLOCK, bytes, createDisk, readDisk, restoreNow, sha, succeed, waitJob, writeDisk } from "../helpers/data";
import { s3Env, startS3 } from "../helpers/s3";
import { MiB, startTestService, type TestService } from "../helpers/service";

const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];

/** A small deterministic PRNG, so a failing run reproduces. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** `count` distinct block indexes of [0, blocks), ascending. */
function scattered(random: () => number, blocks: number, count: number): number[] {
  const picked = new Set<number>();
  while (picked.size < count) picked.add(Math.floor(random() * blocks));
  return [...picked].sort((a, b) => a - b);
}

/** Overwrites `indexes` of the disk with random blocks through the write path (as the data endpoint does), and in `image`. */
async function rewrite(svc: TestService, diskGid: string, image: Buffer, indexes: number[], seed: number): Promise<void> {
  const diskId = uuid(diskGid);
  const data = bytes(indexes.length * BLOCK, seed);
  indexes.forEach((index, k) => data.copy(image, index * BLOCK, k * BLOCK, (k + 1) * BLOCK));
  async function* blocks(): AsyncGenerator<BlockWrite> {
    for (let k = 0; k < indexes.length; k++) yield { index: indexes[k], data: data.subarray(k * BLOCK, (k + 1) * BLOCK) };
  }
  const [{ project_id }] = await svc.ds.query(`SELECT project_id FROM disks WHERE id = $1`, [diskId]);
  await svc.storage.volumes.withDiskLock(diskId, () => svc.storage.volumes.putBlocks(project_id, diskId, blocks()));
}

/** Every segment's live count against the block map, and what is off. */
async function miscounted(svc: TestService): Promise<unknown[]> {
  return svc.ds.query(`
    SELECT s.id, s.live_blocks, (SELECT count(*) FROM disk_blocks b WHERE b.segment_id = s.id) AS actual FROM volume_segments s
     WHERE s.live_blocks <> (SELECT count(*) FROM disk_blocks b WHERE b.segment_id = s.id)`);
}

/** Bytes the file system allocates to the files under a folder of the local blob store. */
function allocatedBytes(dir: string): number {
  let total = 0;
  const walk = (d: string) => {
    if (!fs.existsSync(d)) return;
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else total += fs.statSync(p).blocks * 512;
    }
  };
  walk(dir);
  return total;
}

const versions = async (svc: TestService, diskGid: string) => {
  const [disk] = await svc.ds.query(`SELECT write_version FROM disks WHERE id = $1`, [uuid(diskGid)]);
  const blocks = await svc.ds.query(`SELECT block_index, version, hash FROM disk_blocks WHERE disk_id = $1 ORDER BY block_index`, [uuid(diskGid)]);
  return { disk: disk.write_version, blocks };
};

const compact = (svc: TestService) =>
  compactVolumes(svc.ds, svc.storage.volumes, (diskId, err) => {
    throw new Error(`compacting ${diskId} failed: ${String(err)}`);
  });

/** The compaction tests, on whichever volume backend the service has. */
function compactionCases(get: () => TestService, blobKeys: () => Promise<string[]>) {
  it("deletes dead segments, moves the live blocks of sparse ones without changing a byte or a version, and keeps the live counts exact", async () => {
    const svc = get();
    const disk = await createDisk(svc, "sparse", 8 * MiB);
    const image = Buffer.alloc(8 * MiB);
    const random = prng(7);
    await rewrite(svc, disk, image, [...Array(128).keys()], 1); // one segment, all live
    await rewrite(svc, disk, image, scattered(random, 128, 100), 2); // the first now 28/128 live: sparse
    await rewrite(svc, disk, image, [...Array(128).keys()].slice(0, 64), 3); // and a dead-ish second one
    await rewrite(svc, disk, image, [...Array(128).keys()].slice(0, 64), 4);
    // Zeroing counts too.
    await svc.storage.volumes.withDiskLock(uuid(disk), async () => {
      const [{ project_id }] = await svc.ds.query(`SELECT project_id FROM disks WHERE id = $1`, [uuid(disk)]);
      await svc.storage.volumes.putBlocks(
        project_id,
        uuid(disk),
        (async function* () {
          yield { index: 127, data: null };
        })(),
      );
    });
    image.fill(0, 127 * BLOCK, 128 * BLOCK);
    expect(await miscounted(svc)).toEqual([]);
    const before = await versions(svc, disk);
    expect(sha(await readDisk(svc, disk))).toBe(sha(image));
    const [{ n: segmentsBefore }] = await svc.ds.query(`SELECT count(*)::int AS n FROM volume_segments WHERE disk_id = $1`, [uuid(disk)]);

    const result = await compact(svc);
    expect(result).toMatchObject({ busyDisks: 0 });
    expect(result!.deleted).toBeGreaterThanOrEqual(2);
    expect(result!.written).toBeGreaterThanOrEqual(1);

    expect(await miscounted(svc)).toEqual([]);
    expect(sha(await readDisk(svc, disk))).toBe(sha(image));
    const after = await versions(svc, disk);
    expect(after.disk).toBe(before.disk);
    expect(after.blocks).toEqual(before.blocks);
    // No segment left dead or under half live, and every row has its blob and no blob lacks a row.
    const segments = await svc.ds.query(`SELECT id, live_blocks, size_bytes FROM volume_segments WHERE disk_id = $1`, [uuid(disk)]);
    expect(segments.length).toBeLessThan(segmentsBefore);
    for (const s of segments) expect(Number(s.live_blocks) * BLOCK_SIZE * 2).toBeGreaterThanOrEqual(Number(s.size_bytes));
    expect((await blobKeys()).sort()).toEqual(segments.map((s: { id: string }) => `volumes/${uuid(disk)}/${s.id}`).sort());
    // A second pass finds nothing.
    expect(await compact(svc)).toEqual({ deleted: 0, written: 0, freedBytes: 0, movedBytes: 0, busyDisks: 0 });
  });

  it("leaves a segment a running backup holds until the backup is through, and the backup keeps the bytes of its instant", async () => {
    const svc = get();
    const disk = await createDisk(svc, "held", 4 * MiB);
    const image = Buffer.alloc(4 * MiB);
    await rewrite(svc, disk, image, [...Array(64).keys()], 11);
    const captured = Buffer.from(image);
    // The backup's first read waits until released.
    const blobs = svc.storage.volumes.blobs;
    const readInto = blobs.readInto.bind(blobs);
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let entered!: () => void;
    const waiting = new Promise<void>((r) => (entered = r));
    let first = true;
    blobs.readInto = async (key, offset, into) => {
      if (first) {
        first = false;
        entered();
        await released;
      }
      return readInto(key, offset, into);
    };
    try {
      const { backupId, jobId } = await backup(svc, disk);
      await waiting;
      await rewrite(svc, disk, image, [...Array(64).keys()], 12); // every block overwritten: the captured segment is dead but held
      const [held] = await svc.ds.query(`SELECT s.id, s.live_blocks FROM volume_segments s JOIN backup_blocks bb ON bb.src_segment = s.id WHERE bb.backup_id = $1 LIMIT 1`, [uuid(backupId)]);
      expect(Number(held.live_blocks)).toBe(0);
      await compact(svc);
      expect(await blobs.stat(`volumes/${uuid(disk)}/${held.id}`)).not.toBeNull();
      release();
      await succeed(svc, jobId);
      await compact(svc);
      expect(await blobs.stat(`volumes/${uuid(disk)}/${held.id}`)).toBeNull();
      await restoreNow(svc, { backupId });
      expect(sha(await readDisk(svc, disk))).toBe(sha(captured));
    } finally {
      blobs.readInto = readInto;
      release();
    }
  });

  it("a read whose segment compaction deletes under it reads the blocks where they moved", async () => {
    const svc = get();
    const disk = await createDisk(svc, "reader", 8 * MiB);
    const image = Buffer.alloc(8 * MiB);
    await rewrite(svc, disk, image, [...Array(128).keys()], 21);
    await rewrite(svc, disk, image, scattered(prng(3), 128, 96), 22); // the first segment is a quarter live
    const blobs = svc.storage.volumes.blobs;
    const readInto = blobs.readInto.bind(blobs);
    let moved: Awaited<ReturnType<typeof compact>> = null;
    let missed = 0;
    // Between reading the block refs and the bytes, compaction moves the blocks and deletes the old segment.
    blobs.readInto = async (key, offset, into) => {
      if (!moved) moved = await compact(svc);
      return readInto(key, offset, into).catch((err) => {
        if (err instanceof BlobNotFoundError) missed++;
        throw err;
      });
    };
    try {
      expect(sha(await readDisk(svc, disk))).toBe(sha(image));
    } finally {
      blobs.readInto = readInto;
    }
    expect(moved!.written).toBe(1);
    expect(missed).toBeGreaterThanOrEqual(1); // the reader did meet the deleted segment
    expect(moved!.deleted).toBeGreaterThanOrEqual(1);
  });
}

describe("compaction on the local file system", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ COMPACT_INTERVAL_SECONDS: "0" });
  });
  afterAll(async () => {
    await svc?.stop();
  });
  const keys = async () => {
    const out: string[] = [];
    for await (const b of svc.storage.volumes.blobs.list("volumes/")) out.push(b.key);
    return out;
  };
  compactionCases(() => svc, keys);

  it("counts blocks off when their disk is deleted, and compaction then deletes its segments", async () => {
    const disk = await createDisk(svc, "doomed", 2 * MiB);
    await writeDisk(svc, disk, bytes(2 * MiB, 31));
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: disk });
    expect(await miscounted(svc)).toEqual([]);
    await compact(svc);
    expect(await svc.ds.query(`SELECT id FROM volume_segments WHERE disk_id = $1`, [uuid(disk)])).toEqual([]);
    expect(fs.existsSync(path.join(svc.dataDir, "blobs", "volumes", uuid(disk))) ? fs.readdirSync(path.join(svc.dataDir, "blobs", "volumes", uuid(disk))) : []).toEqual([]);
  });
});

describe("compaction on S3", () => {
  let s3: Awaited<ReturnType<typeof startS3>>;
  let svc: TestService;
  beforeAll(async () => {
    s3 = await startS3();
    svc = await startTestService({
      ...s3Env(s3.config),
      VOLUME_BACKEND: "s3",
      VAULT_BACKEND: "s3",
      COMPACT_INTERVAL_SECONDS: "0",
    });
  });
  afterAll(async () => {
    await svc?.stop();
    await s3?.stop();
  });
  compactionCases(
    () => svc,
    async () => {
      const out: string[] = [];
      for await (const b of svc.storage.volumes.blobs.list("volumes/")) out.push(b.key);
      return out;
    },
  );
});

describe("compaction on its own timer", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ COMPACT_INTERVAL_SECONDS: "1" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  const until = async <T>(what: () => Promise<T>, ok: (v: T) => boolean, timeoutMs: number): Promise<T> => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = await what();
      if (ok(v) || Date.now() > deadline) return v;
      await new Promise((r) => setTimeout(r, 100));
    }
  };

  it("keeps a disk rewritten 20 times in scattered places under twice its size in blob storage, byte for byte, and the next incremental backup no bigger", async () => {
    const size = 64 * MiB;
    const blocks = size / BLOCK;
    const disk = await createDisk(svc, "churn", size);
    const image = Buffer.alloc(size);
    const random = prng(42);
    await rewrite(svc, disk, image, [...Array(blocks).keys()], 100);
    const full = await backupNow(svc, disk);
    const volumesDir = path.join(svc.dataDir, "blobs", "volumes", uuid(disk));
    let written = size;
    let peak = 0;
    const changed = new Set<number>();
    /** The blob bytes once the timer's passes have left no dead or sparse segment of the disk. */
    const settledBytes = async () => {
      const sparse = async () => (await svc.ds.query(`SELECT count(*)::int AS n FROM volume_segments WHERE disk_id = $1 AND live_blocks * 131072 < size_bytes`, [uuid(disk)]))[0].n;
      expect(await until(sparse, (n) => n === 0, 30_000)).toBe(0);
      return allocatedBytes(volumesDir);
    };
    for (let round = 1; round <= 20; round++) {
      // A third of the blocks, scattered: every older segment stays partly live.
      const indexes = scattered(random, blocks, blocks / 3);
      for (const i of indexes) changed.add(i);
      await rewrite(svc, disk, image, indexes, 100 + round);
      written += indexes.length * BLOCK;
      peak = Math.max(peak, allocatedBytes(volumesDir));
      if (round === 10) expect(await settledBytes()).toBeLessThan(2 * size);
    }
    // Without compaction the blobs would hold everything written.
    expect(written).toBeGreaterThan(7 * size);
    const settled = await settledBytes();
    expect(settled).toBeLessThan(2 * size);
    process.stdout.write(`compaction: ${written / MiB} MiB written, peak ${(peak / MiB).toFixed(1)} MiB, settled ${(settled / MiB).toFixed(1)} MiB\n`);
    expect(sha(await readDisk(svc, disk))).toBe(sha(image));

    // Compaction changed no block's version: the incremental backup holds exactly the rewritten blocks.
    const incremental = await backupNow(svc, disk);
    const [{ n }] = await svc.ds.query(`SELECT count(*)::int AS n FROM backup_blocks WHERE backup_id = $1`, [uuid(incremental)]);
    expect(n).toBe(changed.size);
    await restoreNow(svc, { backupId: full });
    await restoreNow(svc, { backupId: incremental });
    expect(sha(await readDisk(svc, disk))).toBe(sha(image));
  });

  it.each([
    ["fails (out of space)", "FAILED"],
    ["is cancelled", "CANCELLED"],
  ])("removes the packs of a backup that %s within a few intervals, and keeps those a finished backup references", async (_how, status) => {
    const project = svc.projectIds.alpha;
    const packsDir = path.join(svc.dataDir, "blobs", "vault", project, "packs");
    const packFiles = () => {
      const out: string[] = [];
      if (!fs.existsSync(packsDir)) return out;
      for (const d of fs.readdirSync(packsDir)) for (const f of fs.readdirSync(path.join(packsDir, d))) out.push(f);
      return out.sort();
    };
    const kept = await createDisk(svc, `kept-${status}`, 4 * MiB);
    await writeDisk(svc, kept, bytes(4 * MiB, status === "FAILED" ? 201 : 301));
    const keptBackup = await backupNow(svc, kept);
    // Let any pass over earlier failures go by: only this job's packs are to go.
    await new Promise((r) => setTimeout(r, 1500));
    const before = packFiles();

    const disk = await createDisk(svc, `abandoned-${status}`, 96 * MiB);
    await writeDisk(svc, disk, bytes(96 * MiB, status === "FAILED" ? 202 : 302));
    const blobs = svc.storage.volumes.blobs;
    const readInto = blobs.readInto.bind(blobs);
    let reads = 0;
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let paused!: () => void;
    const pausing = new Promise<void>((r) => (paused = r));
    // The backup stops reading after 40 MiB (two 16 MiB packs written); then it runs out of space, or is cancelled.
    // Only this disk's reads count: a compaction pass reads other disks' segments meanwhile.
    const ours = `volumes/${uuid(disk)}/`;
    blobs.readInto = async (key, offset, into) => {
      if (key.startsWith(ours) && ++reads === 11) {
        paused();
        await released;
        if (status === "FAILED") throw Object.assign(new Error("no space left on device"), { code: "ENOSPC" });
      }
      return readInto(key, offset, into);
    };
    try {
      const { backupId, jobId } = await backup(svc, disk);
      await pausing;
      const during = await until(
        async () => packFiles().filter((f) => !before.includes(f)),
        (p) => p.length >= 2,
        10_000,
      );
      expect(during.length).toBeGreaterThanOrEqual(2);
      if (status === "CANCELLED") {
        await svc.ok(`mutation ($id: ID!) { cancelJob(input: { id: $id }) { job { id } } }`, { id: jobId });
        // The runner learns of it with its next heartbeat.
        const [{ at }] = await svc.ds.query(`SELECT now() AS at`);
        await until(async () => (await svc.ds.query(`SELECT heartbeat_at > $2 AS seen FROM jobs WHERE id = $1`, [uuid(jobId), at]))[0].seen, Boolean, 10_000);
      }
      release();
      const job = await waitJob(svc, jobId);
      expect(job.status).toBe(status);
      if (status === "FAILED") expect(job.error.code).toBe("NO_SPACE");
      const [b] = await svc.ds.query(`SELECT status FROM backups WHERE id = $1`, [uuid(backupId)]);
      expect(b.status).toBe("ERROR");
    } finally {
      blobs.readInto = readInto;
      release();
    }
    const left = await until(
      async () => packFiles(),
      (p) => p.length === before.length,
      10_000,
    );
    expect(left).toEqual(before);
    expect(await svc.ds.query(`SELECT id FROM vault_packs WHERE project_id = $1 AND NOT (id = ANY($2))`, [project, before])).toEqual([]);
    // The finished backup is whole.
    await succeed(svc, (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: keptBackup })).verifyBackup.job.id);
  });
});
