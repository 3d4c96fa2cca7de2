import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { freePort } from "../../bench/lib/proc";
import { collectAllGarbage } from "../../src/jobs";
import { silentLogger } from "../../src/logger";
import { backupNow, BLOCK, bytes, createDisk, putDisk, readDisk, restoreNow, sha, succeed, writeDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

const qemuImg = requireProgram(["/usr/bin/qemu-img"], "qemu-utils");
const qemuIo = requireProgram(["/usr/bin/qemu-io"], "qemu-utils");

async function run(cmd: string, args: string[]): Promise<string> {
  return (await promisify(execFile)(cmd, args, { encoding: "utf8", timeout: 120_000, maxBuffer: 64 * MiB })).stdout;
}

const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];
const DISK = `query ($id: ID!) { node(id: $id) { ... on Disk { id status usedBytes sizeBytes hydration { bytesInVault bytesLocal } } } }`;
const FROM_BACKUP = `mutation ($b: ID!, $h: Boolean, $s: SafeInt) { createDisk(input: { name: "clone", backupId: $b, hydrate: $h, sizeBytes: $s }) { disk { id status usedBytes } job { id type } } }`;
const EXPORT = `mutation ($id: ID!) { createNbdExport(input: { resourceId: $id }) { nbdExport { uri } } }`;

let svc: TestService;
let tmp: string;
beforeAll(async () => {
  svc = await startTestService({ NBD_PORT: String(await freePort()) });
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-clones-"));
});
afterAll(async () => {
  await svc?.stop();
  fs.rmSync(tmp, { recursive: true, force: true });
});

const count = async (sql: string, params: unknown[] = []) => Number((await svc.ds.query(sql, params))[0].n);
const collect = () => collectAllGarbage(svc.ds, svc.storage, 0, silentLogger);

/** A 1 TiB disk with data on both sides of 2^31 and 2^32, backed up: what clones are made from. */
async function source(name: string): Promise<{ disk: string; backup: string; parts: [number, Buffer][] }> {
  const disk = await createDisk(svc, name, 1024 * GiB);
  const parts: [number, Buffer][] = [
    [0, bytes(3 * BLOCK, 1)],
    [2 ** 31 - BLOCK, bytes(2 * BLOCK, 2)],
    [2 ** 32 - 100, bytes(BLOCK + 200, 3)],
  ];
  for (const [at, data] of parts) await writeDisk(svc, disk, data, at);
  return { disk, backup: await backupNow(svc, disk), parts };
}

/** Checks that the disk reads `parts` at their offsets (and zeros around them), over HTTP. */
async function expectReads(diskId: string, parts: [number, Buffer][]): Promise<void> {
  for (const [at, data] of parts) {
    const got = await readDisk(svc, diskId, [Math.max(0, at - 16), at + data.length + 15]);
    const want = Buffer.concat([Buffer.alloc(Math.min(16, at)), data, Buffer.alloc(16)]);
    expect(sha(got)).toBe(sha(want));
  }
}

describe("a disk from a backup", () => {
  it("is ready at once with no copy and no per-block work, and reads the backup's bytes over HTTP and NBD", async () => {
    const src = await source("src-a");
    const segments = await count(`SELECT count(*) AS n FROM volume_segments`);
    const { result, count: statements } = await svc.countQueries(() => svc.ok(FROM_BACKUP, { b: src.backup }));
    const made = result.createDisk;
    expect(made.disk.status).toBe("AVAILABLE");
    expect(made.job).toBeNull();
    expect(made.disk.usedBytes).toBe(8 * BLOCK);
    // Creation wrote no block and copied nothing: its cost does not grow with the disk or its data.
    expect(statements).toBeLessThan(15);
    expect(await count(`SELECT count(*) AS n FROM disk_blocks WHERE disk_id = $1`, [uuid(made.disk.id)])).toBe(0);
    expect(await count(`SELECT count(*) AS n FROM volume_segments`)).toBe(segments);
    expect((await svc.ok(DISK, { id: made.disk.id })).node.hydration).toEqual({ bytesInVault: 8 * BLOCK, bytesLocal: 0 });

    await expectReads(made.disk.id, src.parts);
    const { uri } = (await svc.ok(EXPORT, { id: made.disk.id })).createNbdExport.nbdExport;
    const dump = await run(qemuIo!, ["-f", "raw", "-r", "-c", `read -v ${2 ** 32 - 100} 16`, uri]);
    expect(dump.replace(/\s+/g, " ")).toContain(src.parts[2][1].subarray(0, 16).toString("hex").match(/../g)!.join(" "));
  });

  it("copies on write: a write replaces whole blocks in the disk's own storage, and the backup is never touched", async () => {
    const src = await source("src-b");
    const clone = (await svc.ok(FROM_BACKUP, { b: src.backup })).createDisk.disk.id;
    // Into part of a block the source holds (the rest of it must stay), and zeros over another.
    await writeDisk(svc, clone, Buffer.from("written"), BLOCK + 5);
    await writeDisk(svc, clone, Buffer.alloc(BLOCK), 2 ** 31);
    const first = Buffer.from(src.parts[0][1]);
    Buffer.from("written").copy(first, BLOCK + 5);
    const second = Buffer.concat([src.parts[1][1].subarray(0, BLOCK), Buffer.alloc(BLOCK)]);
    await expectReads(clone, [[0, first], [2 ** 31 - BLOCK, second], src.parts[2]]);
    const disk = (await svc.ok(DISK, { id: clone })).node;
    expect(disk.usedBytes).toBe(7 * BLOCK);
    expect(disk.hydration).toEqual({ bytesInVault: 6 * BLOCK, bytesLocal: BLOCK });

    // The source backup still restores as it was.
    const again = (await svc.ok(FROM_BACKUP, { b: src.backup })).createDisk.disk.id;
    await expectReads(again, src.parts);

    // Its first backup stores only what changed; a disk from that backup reads the clone's bytes.
    const b = await backupNow(svc, clone);
    const stored = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { sizeBytes storedBytes } } }`, { id: b })).node;
    expect(stored.sizeBytes).toBe(7 * BLOCK);
    expect(stored.storedBytes).toBeLessThanOrEqual(2 * BLOCK);
    const ofClone = (await svc.ok(FROM_BACKUP, { b })).createDisk.disk.id;
    await expectReads(ofClone, [[0, first], [2 ** 31 - BLOCK, second], src.parts[2]]);
  });

  it("stays whole when its backup is deleted and the vault collected, read over NBD meanwhile", async () => {
    const src = await source("src-c");
    const clone = (await svc.ok(FROM_BACKUP, { b: src.backup })).createDisk.disk.id;
    await writeDisk(svc, clone, bytes(BLOCK, 77), 5 * BLOCK);
    const cloneOfClone = (await svc.ok(FROM_BACKUP, { b: await backupNow(svc, clone) })).createDisk.disk.id;
    const { uri } = (await svc.ok(EXPORT, { id: clone })).createNbdExport.nbdExport;
    const expected = path.join(tmp, "expected.raw");
    const fd = fs.openSync(expected, "w");
    fs.ftruncateSync(fd, 1024 * GiB);
    for (const [at, data] of [...src.parts, [5 * BLOCK, bytes(BLOCK, 77)] as [number, Buffer]]) fs.writeSync(fd, data, 0, data.length, at);
    fs.closeSync(fd);

    // The source disk goes too, and with it every block it had of its own.
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: src.disk });
    const job = (await svc.ok(`mutation ($id: ID!) { deleteBackup(input: { id: $id }) { job { id } } }`, { id: src.backup })).deleteBackup.job.id;
    await succeed(svc, job);
    await collect();
    expect(await count(`SELECT count(*) AS n FROM disks WHERE id = $1 AND clone_manifest_id IS NOT NULL`, [uuid(clone)])).toBe(1);
    // The vault says what it keeps for them: the deleted backup's 8 blocks, once (the clone of the clone reads through the clone's backup).
    const usage = async () => (await svc.ok(`{ viewer { storage { cloneSourceBytes } } }`)).viewer.storage.cloneSourceBytes;
    expect(await usage()).toBe(8 * BLOCK);
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", expected, uri]);
    await expectReads(cloneOfClone, [...src.parts, [5 * BLOCK, bytes(BLOCK, 77)]]);
    fs.rmSync(expected);

    // Once the clones are gone, so are the kept block list and its chunks.
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: clone });
    await collect();
    expect(await count(`SELECT count(*) AS n FROM clone_manifests m WHERE NOT EXISTS (SELECT 1 FROM disks d WHERE d.clone_manifest_id = m.id)`)).toBe(0);
    expect(await usage()).toBe(0);
  });

  it("hydrates in the background while it is written, and then reads nothing from the vault", async () => {
    const src = await source("src-d");
    const made = (await svc.ok(FROM_BACKUP, { b: src.backup, h: true, s: 1024 * GiB })).createDisk;
    expect(made.disk.status).toBe("AVAILABLE");
    expect(made.job.type).toBe("CREATE_DISK");
    // A write made while it hydrates wins over the source's block.
    await writeDisk(svc, made.disk.id, Buffer.alloc(BLOCK, 9), 2 * BLOCK);
    const job = await succeed(svc, made.job.id);
    expect(job.bytesDone).toBeLessThanOrEqual(8 * BLOCK);
    const disk = (await svc.ok(DISK, { id: made.disk.id })).node;
    expect(disk.hydration).toEqual({ bytesInVault: 0, bytesLocal: 8 * BLOCK });
    expect(disk.usedBytes).toBe(8 * BLOCK);
    expect(await count(`SELECT count(*) AS n FROM disks WHERE id = $1 AND clone_backup_id IS NULL`, [uuid(made.disk.id)])).toBe(1);
    const first = Buffer.concat([src.parts[0][1].subarray(0, 2 * BLOCK), Buffer.alloc(BLOCK, 9)]);
    await expectReads(made.disk.id, [[0, first], src.parts[1], src.parts[2]]);

    // A disk made without it is hydrated on demand; one that is its own already is refused.
    const later = (await svc.ok(FROM_BACKUP, { b: src.backup })).createDisk.disk.id;
    const h = (await svc.ok(`mutation ($id: ID!) { hydrateDisk(input: { id: $id }) { disk { id } job { id } } }`, { id: later })).hydrateDisk;
    await succeed(svc, h.job.id);
    expect((await svc.ok(DISK, { id: later })).node.hydration.bytesInVault).toBe(0);
    await expectReads(later, src.parts);
    const refused = await svc.gql(`mutation ($id: ID!) { hydrateDisk(input: { id: $id }) { job { id } } }`, { id: later });
    expect(refused.errors?.[0].extensions?.code).toBe("FAILED_PRECONDITION");
  });

  it("restores onto a clone, zeroing what the backup does not hold", async () => {
    const src = await source("src-e");
    const clone = (await svc.ok(FROM_BACKUP, { b: src.backup })).createDisk.disk.id;
    const blank = await createDisk(svc, "blank", 1024 * GiB);
    await writeDisk(svc, blank, bytes(BLOCK, 5), 10 * BLOCK);
    const other = await backupNow(svc, blank);
    await restoreNow(svc, { backupId: other, targetDiskId: clone });
    const disk = (await svc.ok(DISK, { id: clone })).node;
    expect(disk.usedBytes).toBe(BLOCK);
    await expectReads(clone, [
      [0, Buffer.alloc(3 * BLOCK)],
      [2 ** 31 - BLOCK, Buffer.alloc(2 * BLOCK)],
      [10 * BLOCK, bytes(BLOCK, 5)],
    ]);
  });

  it("answers a missing chunk with a code, over HTTP, and the service goes on", async () => {
    const disk = await createDisk(svc, "fragile", 8 * MiB);
    await writeDisk(svc, disk, bytes(BLOCK, 31), 3 * BLOCK);
    const b = await backupNow(svc, disk);
    const clone = (await svc.ok(FROM_BACKUP, { b })).createDisk.disk.id;
    // The chunk's pack loses its bytes under the clone.
    const [loc] = await svc.ds.query(`SELECT c.pack_id FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash WHERE bb.backup_id = $1`, [uuid(b)]);
    const file = path.join(svc.dataDir, "blobs", "vault", svc.projectIds.alpha, "packs", loc.pack_id.slice(0, 2), loc.pack_id);
    fs.truncateSync(file, 0);
    const res = await svc.http(`/v1/disks/${clone}/data`, { headers: { range: `bytes=${3 * BLOCK}-${3 * BLOCK + 99}` } });
    expect(res.status).toBe(500);
    const body = (await res.json()) as { error: { code: string; message: string } };
    expect(body.error.code).toBe("CORRUPT_CHUNK");
    expect(body.error.message).not.toMatch(/\//);
    expect((await readDisk(svc, clone, [0, 99])).equals(Buffer.alloc(100))).toBe(true);
    // A write over the damaged block replaces it.
    expect((await putDisk(svc, clone, bytes(BLOCK, 32), 3 * BLOCK)).status).toBe(200);
    expect((await readDisk(svc, clone, [3 * BLOCK, 4 * BLOCK - 1])).equals(bytes(BLOCK, 32))).toBe(true);
  });
});

describe("disks and servers from an image", () => {
  it("are ready at once, and stay whole when the image is deleted", async () => {
    const gold = (await svc.ok(`mutation { createServer(input: { name: "gold", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${64 * MiB} }) { server { disks { nodes { id } } } } }`)).createServer
      .server;
    const src = gold.disks.nodes[0].id;
    const data = bytes(4 * BLOCK + 7, 41);
    await writeDisk(svc, src, data, 9 * MiB);
    const made = (await svc.ok(`mutation ($d: ID!) { createImage(input: { name: "gold", diskId: $d, type: SYSTEM_DISK }) { image { id } job { id } } }`, { d: src })).createImage;
    await succeed(svc, made.job.id);
    const servers = [];
    for (let i = 0; i < 3; i++) {
      const s = (
        await svc.ok(
          `mutation ($i: ID!, $n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, imageId: $i }) { server { id status disks { nodes { id status usedBytes } } } job { id } } }`,
          {
            i: made.image.id,
            n: `web-${i}`,
          },
        )
      ).createServer;
      expect(s.server.status).toBe("ACTIVE");
      expect(s.job).toBeNull();
      expect(s.server.disks.nodes[0]).toMatchObject({ status: "IN_USE", usedBytes: 5 * BLOCK });
      servers.push(s.server.disks.nodes[0].id);
    }
    await writeDisk(svc, servers[0], Buffer.from("mine"), 9 * MiB);
    await svc.ok(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id: made.image.id });
    await collect();
    const mine = Buffer.from(data);
    Buffer.from("mine").copy(mine);
    await expectReads(servers[0], [[9 * MiB, mine]]);
    await expectReads(servers[2], [[9 * MiB, data]]);
  });
});
