import fs from "node:fs";
import path from "node:path";
import { backup, backupNow, BLOCK, bytes, createDisk, readDisk, restoreNow, sha, succeed, waitJob, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const BACKUP = `query ($id: ID!) { node(id: $id) { ... on Backup {
  id name status trigger resourceType resourceId sizeBytes storedBytes progress completedAt error
  children { nodes { id name resourceId sizeBytes status } } job { status }
} } }`;
const getBackup = async (id: string) => (await svc.ok(BACKUP, { id })).node;
const code = (r: { errors?: { extensions?: Record<string, unknown> }[] }) => r.errors?.[0]?.extensions?.code;

async function deltaRows(backupId: string): Promise<number> {
  const uuid = Buffer.from(backupId, "base64url").toString().split(":")[1];
  const [{ n }] = await svc.ds.query(`SELECT count(*)::int AS n FROM backup_blocks WHERE backup_id = $1`, [uuid]);
  return n;
}

async function vaultBytes(): Promise<number> {
  let total = 0;
  const walk = (dir: string) => {
    if (!fs.existsSync(dir)) return;
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      if (e.isDirectory()) walk(path.join(dir, e.name));
      else total += fs.statSync(path.join(dir, e.name)).size;
    }
  };
  walk(path.join(svc.dataDir, "blobs", "vault"));
  return total;
}

describe("disk backups", () => {
  it("backs a disk up, named manualbk_<short id>, and restores it byte for byte", async () => {
    const disk = await createDisk(svc, "data", 16 * MiB);
    const content = Buffer.concat([bytes(2 * MiB, 1), Buffer.alloc(MiB), Buffer.from("hello stowage\n".repeat(100_000))]);
    await writeDisk(svc, disk, content, MiB);
    const image = await readDisk(svc, disk);
    const { backupId, jobId } = await backup(svc, disk);
    const creating = await getBackup(backupId);
    expect(creating.name).toMatch(/^manualbk_[0-9a-f]{8}$/);
    expect(["CREATING", "AVAILABLE"]).toContain(creating.status);
    await succeed(svc, jobId);
    const done = await getBackup(backupId);
    expect(done).toMatchObject({ status: "AVAILABLE", trigger: "MANUAL", resourceType: "DISK", resourceId: disk, progress: 1, error: null });
    expect(done.completedAt).not.toBeNull();
    // The backup represents the written blocks; the vault stores less (text compresses, zeros cost nothing).
    const written = Math.ceil((2 * MiB) / BLOCK) + Math.ceil(1_400_000 / BLOCK);
    expect(done.sizeBytes).toBe(written * BLOCK);
    expect(done.storedBytes).toBeGreaterThan(2 * MiB);
    expect(done.storedBytes).toBeLessThan(done.sizeBytes);

    await writeDisk(svc, disk, bytes(5 * MiB, 2), 3 * MiB);
    expect(sha(await readDisk(svc, disk))).not.toBe(sha(image));
    await restoreNow(svc, { backupId });
    expect((await readDisk(svc, disk)).equals(image)).toBe(true);
  });

  it("an incremental backup holds and stores only the changed blocks, yet restores the whole disk", async () => {
    const disk = await createDisk(svc, "incremental", 32 * MiB);
    await writeDisk(svc, disk, bytes(24 * MiB, 3));
    const full = await backupNow(svc, disk);
    const v1 = await readDisk(svc, disk);
    expect(await deltaRows(full)).toBe((24 * MiB) / BLOCK);

    const changed = [3, 77, 200, 301];
    for (const b of changed) await writeDisk(svc, disk, bytes(BLOCK, 100 + b), b * BLOCK);
    const before = await vaultBytes();
    const incremental = await backupNow(svc, disk);
    const growth = (await vaultBytes()) - before;
    const v2 = await readDisk(svc, disk);
    expect(await deltaRows(incremental)).toBe(changed.length);
    expect((await getBackup(incremental)).storedBytes).toBeLessThanOrEqual(changed.length * BLOCK + 1024);
    expect(growth).toBeLessThanOrEqual(2 * changed.length * BLOCK);

    // The viewer sees what the backups represent against what the vault stores.
    const { viewer } = await svc.ok(`{ viewer { storage { logicalBytes storedBytes dedupRatio } } }`);
    const [{ logical }] = await svc.ds.query(`SELECT sum(size_bytes)::bigint AS logical FROM backups WHERE project_id = $1 AND resource_type = 'DISK'`, [svc.projectIds.alpha]);
    expect(viewer.storage.logicalBytes).toBe(Number(logical));
    expect(viewer.storage.storedBytes).toBe(await vaultBytes());
    expect(viewer.storage.dedupRatio).toBeCloseTo(Number(logical) / (await vaultBytes()), 6);
    expect(viewer.storage.dedupRatio).toBeGreaterThan(1);

    // Each restores on its own.
    await writeDisk(svc, disk, Buffer.alloc(32 * MiB));
    await restoreNow(svc, { backupId: incremental, hydrate: true });
    expect((await readDisk(svc, disk)).equals(v2)).toBe(true);
    const back = await restoreNow(svc, { backupId: full, hydrate: true });
    expect(back.bytesTotal).toBe(changed.length * BLOCK); // only the blocks that differ are written
    expect((await readDisk(svc, disk)).equals(v1)).toBe(true);
  });

  it("a backup with nothing changed stores nothing and still restores everything", async () => {
    const disk = await createDisk(svc, "unchanged", 8 * MiB);
    await writeDisk(svc, disk, bytes(4 * MiB, 4));
    await backupNow(svc, disk);
    const again = await backupNow(svc, disk);
    expect(await deltaRows(again)).toBe(0);
    expect((await getBackup(again)).storedBytes).toBe(0);
    const target = await createDisk(svc, "unchanged-copy", 8 * MiB);
    await restoreNow(svc, { backupId: again, targetDiskId: target });
    expect((await readDisk(svc, target)).equals(await readDisk(svc, disk))).toBe(true);
  });

  it("deleting any backup of a chain leaves every other one restorable, and GC reclaims what only it held", async () => {
    const disk = await createDisk(svc, "chain", 8 * MiB);
    const states: Buffer[] = [];
    const ids: string[] = [];
    await writeDisk(svc, disk, bytes(8 * MiB, 5));
    for (let i = 0; i < 4; i++) {
      if (i > 0) await writeDisk(svc, disk, bytes(3 * BLOCK, 50 + i), ((i * 17) % 120) * BLOCK);
      if (i === 2) await writeDisk(svc, disk, Buffer.alloc(2 * BLOCK), 60 * BLOCK); // zeroed blocks must stay zero
      ids.push(await backupNow(svc, disk));
      states.push(await readDisk(svc, disk));
    }
    const del = async (id: string) => {
      const r = await svc.ok(`mutation ($id: ID!) { deleteBackup(input: { id: $id }) { deletedBackupId job { id } } }`, { id });
      expect(r.deleteBackup.deletedBackupId).toBe(id);
      await succeed(svc, r.deleteBackup.job.id);
    };
    await del(ids[1]); // a middle one
    await del(ids[0]); // the full one at the root
    for (const i of [2, 3]) {
      const target = await createDisk(svc, `chain-${i}`, 8 * MiB);
      await restoreNow(svc, { backupId: ids[i], targetDiskId: target, hydrate: true }); // hydrated: the disks read nothing of the backups
      expect((await readDisk(svc, target)).equals(states[i])).toBe(true);
    }
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { id } }`, { id: ids[0] })).node).toBeNull();

    // Now delete everything: the vault holds no chunk of this disk any more.
    const before = await vaultBytes();
    await del(ids[2]);
    await del(ids[3]);
    const projectChunks = await svc.ds.query(`SELECT count(*)::int AS n FROM vault_chunks c WHERE NOT EXISTS (SELECT 1 FROM backup_blocks bb WHERE bb.hash = c.hash)`);
    expect(projectChunks[0].n).toBe(0);
    expect(await vaultBytes()).toBeLessThan(before - 7 * MiB);
  });

  it("restores onto a disk holding other data across 640 MiB: what differs goes at once, and the hydration copies exactly the backup's data", async () => {
    const size = 640 * MiB;
    const source = await createDisk(svc, "batches", size);
    const pieces: [number, Buffer][] = [
      [0, bytes(MiB, 61)],
      [32 * MiB - 2 * BLOCK, bytes(4 * BLOCK, 62)], // across the first border
      [288 * MiB - BLOCK, bytes(2 * BLOCK, 65)], // across the second
      [300 * MiB, bytes(3 * MiB, 63)],
      [size - MiB, bytes(MiB, 64)],
    ];
    for (const [off, data] of pieces) await writeDisk(svc, source, data, off);
    const b = await backupNow(svc, source);
    // The target holds other data, some where the backup has none (to read as zeros).
    const target = await createDisk(svc, "batches-target", size);
    for (const off of [5 * MiB, 40 * MiB, 290 * MiB, 560 * MiB, 300 * MiB + BLOCK]) await writeDisk(svc, target, bytes(2 * BLOCK, off), off);
    const job = await restoreNow(svc, { backupId: b, targetDiskId: target, hydrate: true });
    expect(sha(await readDisk(svc, target))).toBe(sha(await readDisk(svc, source)));
    // Every block of the backup differs from the target's; the ones that read as zeros cost nothing.
    const written = pieces.reduce((n, [, data]) => n + data.length, 0);
    expect(job).toMatchObject({ bytesTotal: written, bytesDone: written });
  });

  it("refuses a second backup while one runs, and a restore while backing up", async () => {
    const disk = await createDisk(svc, "busy", 64 * MiB);
    await writeDisk(svc, disk, bytes(64 * MiB, 6));
    const first = await backupNow(svc, disk);
    await writeDisk(svc, disk, bytes(32 * MiB, 7));
    const { jobId } = await backup(svc, disk);
    const second = await svc.gql(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } } }`, { r: disk });
    const restore = await svc.gql(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b: first });
    const job = await waitJob(svc, jobId);
    if (job.status === "SUCCEEDED" && !second.errors) throw new Error("the backup finished before the second request; make the disk bigger");
    expect(code(second)).toBe("CONFLICT");
    expect(code(restore)).toBe("CONFLICT");
  });
});

describe("server backups", () => {
  async function createServer(name: string) {
    return (
      await svc.ok(
        `mutation ($n: String!) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${8 * MiB}, dataDisks: [{ sizeBytes: ${8 * MiB} }, { sizeBytes: ${4 * MiB} }] }) {
        server { id disks { nodes { id type device sizeBytes } } } } }`,
        { n: name },
      )
    ).createServer.server;
  }

  it("captures all disks at one instant: writes after the request do not leak in", async () => {
    const server = await createServer("pit");
    const disks: string[] = server.disks.nodes.map((d: any) => d.id);
    for (const [i, d] of disks.entries()) await writeDisk(svc, d, bytes(4 * MiB, 20 + i));
    const before = await Promise.all(disks.map((d) => readDisk(svc, d)));
    const { backupId, jobId } = await backup(svc, server.id, "pit-backup");
    // Overwrite everything right away, while the job copies.
    await Promise.all(disks.map((d, i) => writeDisk(svc, d, bytes(4 * MiB, 90 + i))));
    await succeed(svc, jobId);
    const b = await getBackup(backupId);
    expect(b.name).toBe("pit-backup");
    expect(b.resourceType).toBe("SERVER");
    expect(b.children.nodes.map((c: any) => c.resourceId)).toEqual(disks);
    expect(b.children.nodes.map((c: any) => c.name)).toEqual(["pit-backup-vda", "pit-backup-vdb", "pit-backup-vdc"]);
    expect(b.sizeBytes).toBe(3 * 4 * MiB);

    const restored = await restoreNow(svc, { backupId, powerOn: false });
    expect(restored.status).toBe("SUCCEEDED");
    for (const [i, d] of disks.entries()) expect((await readDisk(svc, d)).equals(before[i])).toBe(true);
    const after = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { status disks { nodes { status } } } } }`, { id: server.id });
    expect(after.node.status).toBe("SHUTOFF");
    expect(after.node.disks.nodes.every((d: any) => d.status === "IN_USE")).toBe(true);
    await restoreNow(svc, { backupId });
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { status } } }`, { id: server.id })).node.status).toBe("ACTIVE");
  });

  it("restores through mappings, keeping the rules on types and sizes", async () => {
    const server = await createServer("mapped");
    const [sys, big, small] = server.disks.nodes;
    await writeDisk(svc, big.id, bytes(6 * MiB, 30));
    const backupId = await backupNow(svc, server.id);
    const children = (await getBackup(backupId)).children.nodes;
    const bigChild = children.find((c: any) => c.resourceId === big.id).id;
    const smallChild = children.find((c: any) => c.resourceId === small.id).id;
    const sysChild = children.find((c: any) => c.resourceId === sys.id).id;

    const run = (input: Record<string, unknown>) => svc.gql(`mutation ($i: RestoreBackupInput!) { restoreBackup(input: $i) { job { id } } }`, { i: input });
    expect(code(await run({ backupId, mappings: [{ backupId: bigChild, diskId: sys.id }] }))).toBe("FAILED_PRECONDITION"); // data onto system
    expect(code(await run({ backupId, mappings: [{ backupId: bigChild, diskId: small.id }] }))).toBe("FAILED_PRECONDITION"); // too small
    expect(
      code(
        await run({
          backupId,
          mappings: [
            { backupId: bigChild, diskId: big.id },
            { backupId: smallChild, diskId: big.id },
          ],
        }),
      ),
    ).toBe("BAD_USER_INPUT");
    expect(code(await run({ backupId: bigChild }))).toBe("FAILED_PRECONDITION"); // children restore through their server backup

    // A system-disk backup may go to a data disk that is large enough.
    const spare = await createDisk(svc, "spare", 8 * MiB);
    await svc.ok(`mutation ($d: ID!, $s: ID!) { attachDisk(input: { diskId: $d, serverId: $s }) { disk { id } } }`, { d: spare, s: server.id });
    await writeDisk(svc, big.id, Buffer.alloc(6 * MiB));
    await restoreNow(svc, {
      backupId,
      mappings: [
        { backupId: bigChild, diskId: spare },
        { backupId: sysChild, diskId: big.id },
      ],
    });
    expect((await readDisk(svc, spare)).subarray(0, 6 * MiB).equals(bytes(6 * MiB, 30))).toBe(true);
  });

  it("creates a new disk from a disk backup", async () => {
    const disk = await createDisk(svc, "source", 4 * MiB);
    await writeDisk(svc, disk, bytes(3 * MiB, 40));
    const b = await backupNow(svc, disk);
    const r = (
      await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "copy", backupId: $b, sizeBytes: ${8 * MiB} }) { disk { id status sizeBytes sourceBackup { id } } job { id type } } }`, { b })
    ).createDisk;
    // Ready at once: it reads from the backup in the vault until written.
    expect(r.disk).toMatchObject({ status: "AVAILABLE", sizeBytes: 8 * MiB, sourceBackup: { id: b } });
    expect(r.job).toBeNull();
    const copy = await readDisk(svc, r.disk.id);
    expect(copy.subarray(0, 3 * MiB).equals(bytes(3 * MiB, 40))).toBe(true);
    expect(copy.subarray(3 * MiB).equals(Buffer.alloc(5 * MiB))).toBe(true);
    const small = await svc.gql(`mutation ($b: ID!) { createDisk(input: { name: "tiny", backupId: $b, sizeBytes: ${MiB} }) { disk { id } } }`, { b });
    expect(code(small)).toBe("BAD_USER_INPUT");
  });
});

describe("verification", () => {
  it("re-reads every chunk and catches a corrupted one, naming the block", async () => {
    const disk = await createDisk(svc, "verify", 4 * MiB);
    await writeDisk(svc, disk, bytes(4 * MiB, 60));
    const b = await backupNow(svc, disk);
    const ok = (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: b })).verifyBackup.job.id;
    await succeed(svc, ok);

    // Flip bytes inside the stored chunk of block 5.
    const uuid = Buffer.from(b, "base64url").toString().split(":")[1];
    const [loc] = await svc.ds.query(`SELECT c.pack_id, c.pack_offset, c.stored_size FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash WHERE bb.backup_id = $1 AND bb.block_index = 5`, [
      uuid,
    ]);
    const file = path.join(svc.dataDir, "blobs", "vault", svc.projectIds.alpha, "packs", loc.pack_id.slice(0, 2), loc.pack_id);
    const fd = fs.openSync(file, "r+");
    fs.writeSync(fd, Buffer.from("CORRUPT!"), 0, 8, Number(loc.pack_offset) + 100);
    fs.closeSync(fd);

    const bad = (await svc.ok(`mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: b })).verifyBackup.job.id;
    const job = await waitJob(svc, bad);
    expect(job.status).toBe("FAILED");
    expect(job.error.code).toBe("VERIFY_FAILED");
    expect(job.error.message).toMatch(/1 of 64 chunks failed verification/);
    expect(job.error.message).toMatch(/block 5 \(bytes 327680-393215\)/);
    expect(job.error.message).toMatch(/corrupt/);
    const after = await getBackup(b);
    expect(after.status).toBe("ERROR");
    const restore = await svc.gql(`mutation ($b: ID!) { restoreBackup(input: { backupId: $b }) { job { id } } }`, { b });
    expect(code(restore)).toBe("FAILED_PRECONDITION");
  });
});
