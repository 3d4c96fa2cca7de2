/**
 * The NBD write journal: what a FLUSH acknowledged survives the process being killed
 * before any commit, and a restore onto the disk leaves no journaled write to come
 * back over the backup's bytes.
 */
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import { freePort } from "../../bench/lib/proc";
import { backupNow, BLOCK, bytes, createDisk, readDisk, restoreNow, sha, writeDisk } from "../helpers/data";
import { gqlAt, serveChild, type ChildService } from "../helpers/child-service";
import { createTestDatabase, type TestDatabase } from "../helpers/db";
import { encodeRecords } from "../../src/nbd/journal";
import { RawNbd } from "../helpers/nbd-client";
import { MiB, startTestService, type TestService } from "../helpers/service";

jest.setTimeout(180_000);

const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];
const nameOf = (uri: string) => new URL(uri).pathname.slice(1);
const EXPORT = `mutation ($id: ID!) { createNbdExport(input: { resourceId: $id }) { nbdExport { uri } } }`;
const WRITE = 1;
const FLUSH = 3;
const FUA = 1;

/** The writes of the test, the last three left unflushed: [offset, bytes]. */
function writes(): [number, Buffer][] {
  return [
    [100, Buffer.from("the first write")],
    [5 * BLOCK + 4096, bytes(4096, 2)],
    [7 * BLOCK - 10, bytes(20, 3)], // across two blocks
    [100, Buffer.from("THE")], // over the first
  ];
}

describe("a service killed after a FLUSH", () => {
  let db: TestDatabase;
  let dataDir: string;
  const children: ChildService[] = [];
  beforeAll(async () => {
    db = await createTestDatabase();
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-journal-"));
  });
  afterAll(async () => {
    for (const c of children) await c.kill();
    await db?.drop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it("keeps every write the FLUSH acknowledged, applied when the service starts again, and nothing of the journal after", async () => {
    const nbdPort = await freePort();
    // No commit comes by itself for ten minutes: only the journal holds the writes when the process dies.
    // The compiled build, as `npm start` runs it: two starts under ts-node are seconds of CPU that the tests beside this one feel.
    const env = { DATABASE_URL: db.url, STOWAGE_DATA_DIR: dataDir, NBD_PORT: String(nbdPort), NBD_COMMIT_DELAY_MS: "600000", STOWAGE_DIST: "1" };
    const first = await serveChild(env, 180_000);
    children.push(first);
    const key = first.defaultKey();
    const ok = async (url: string, query: string, variables?: Record<string, unknown>) => {
      const r = await gqlAt(url, key, query, variables);
      if (r.errors) throw new Error(JSON.stringify(r.errors));
      return r.data;
    };
    const disk = (await ok(first.url, `mutation { createDisk(input: { name: "j", sizeBytes: ${8 * MiB} }) { disk { id } } }`)).createDisk.disk.id;
    const res = await fetch(`${first.url}/v1/disks/${encodeURIComponent(disk)}/data`, {
      method: "PUT",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/octet-stream", "content-range": `bytes 0-${8 * MiB - 1}/*` },
      body: new Uint8Array(Buffer.alloc(8 * MiB, 0x11)),
    });
    expect(res.status).toBeLessThan(300);
    const { uri } = (await ok(first.url, EXPORT, { id: disk })).createNbdExport.nbdExport;

    const c = await RawNbd.connect(nbdPort);
    await c.go(nameOf(uri));
    const expected = Buffer.alloc(8 * MiB, 0x11);
    let cookie = 1;
    for (const [offset, data] of writes()) {
      c.request(WRITE, offset, data.length, cookie++, 0, data);
      expect(await c.reply()).toMatchObject({ error: 0 });
      data.copy(expected, offset);
    }
    c.request(FLUSH, 0, 0, cookie++);
    expect(await c.reply()).toMatchObject({ error: 0 });
    // A write with FUA is durable when it is acknowledged, like a FLUSH.
    const fua = bytes(300, 4);
    c.request(WRITE, 3 * MiB + 7, fua.length, cookie++, FUA, fua);
    expect(await c.reply()).toMatchObject({ error: 0 });
    fua.copy(expected, 3 * MiB + 7);
    // Acknowledged, never flushed: it may or may not survive, as with a disk's volatile cache.
    c.request(WRITE, 6 * MiB, 10, cookie, 0, Buffer.alloc(10, 0xee));
    expect(await c.reply()).toMatchObject({ error: 0 });

    const pg = new Client({ connectionString: db.url });
    await pg.connect();
    try {
      const before = await pg.query(`SELECT count(*)::int AS n FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)]);
      expect(before.rows[0].n).toBe(2);
      await first.kill();
      c.end();

      const second = await serveChild(env, 180_000);
      children.push(second);
      // The journal is applied and committed, and its rows go.
      const deadline = Date.now() + 30_000;
      while ((await pg.query(`SELECT 1 FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).rows.length) {
        if (Date.now() > deadline) throw new Error(`the journal was not applied: ${second.output()}`);
        await new Promise((r) => setTimeout(r, 100));
      }
      const read = await fetch(`${second.url}/v1/disks/${encodeURIComponent(disk)}/data`, { headers: { authorization: `Bearer ${key}` } });
      const now = Buffer.from(await read.arrayBuffer());
      expect(now.subarray(0, 6 * MiB).equals(expected.subarray(0, 6 * MiB))).toBe(true);
      expect(now.subarray(6 * MiB + 10).equals(expected.subarray(6 * MiB + 10))).toBe(true);
      expect(second.output()).toContain("nbd journal applied");
    } finally {
      await pg.end();
    }
  });
});

describe("journaled writes in one service", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ NBD_PORT: String(await freePort()), NBD_COMMIT_DELAY_MS: "600000" });
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("leaves a restored disk with the backup's bytes and no journal row, whatever was flushed before the restore", async () => {
    const disk = await createDisk(svc, "restored", 4 * MiB);
    const content = bytes(4 * MiB, 7);
    await writeDisk(svc, disk, content);
    const backup = await backupNow(svc, disk);
    const { uri } = (await svc.ok(EXPORT, { id: disk })).createNbdExport.nbdExport;
    const c = await RawNbd.connect(svc.nbdPort);
    await c.go(nameOf(uri));
    c.request(WRITE, 64, 4096, 1, 0, Buffer.alloc(4096, 0x55));
    expect(await c.reply()).toMatchObject({ error: 0 });
    c.request(FLUSH, 0, 0, 2);
    expect(await c.reply()).toMatchObject({ error: 0 });
    expect(await svc.ds.query(`SELECT seq FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).toHaveLength(1);

    await restoreNow(svc, { backupId: backup, targetDiskId: disk });
    expect(await c.closedWithin(5000)).toBe(true);
    expect(sha(await readDisk(svc, disk))).toBe(sha(content));
    expect(await svc.ds.query(`SELECT seq FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).toEqual([]);
    // A new connection applies nothing over the backup's bytes.
    const again = await RawNbd.connect(svc.nbdPort);
    const { uri: uri2 } = (await svc.ok(EXPORT, { id: disk })).createNbdExport.nbdExport;
    await again.go(nameOf(uri2));
    again.request(0, 0, BLOCK, 3);
    expect((await again.reply(BLOCK)).data.equals(content.subarray(0, BLOCK))).toBe(true);
    again.end();
  });

  it("stops journaling a disk whose lock went with its database session: FLUSH commits, and the rows go", async () => {
    const disk = await createDisk(svc, "lost-lock", MiB);
    const { uri } = (await svc.ok(EXPORT, { id: disk })).createNbdExport.nbdExport;
    const c = await RawNbd.connect(svc.nbdPort);
    await c.go(nameOf(uri));
    c.request(WRITE, 0, 5, 1, 0, Buffer.from("first"));
    expect(await c.reply()).toMatchObject({ error: 0 });
    c.request(FLUSH, 0, 0, 2);
    expect(await c.reply()).toMatchObject({ error: 0 });
    expect(await svc.ds.query(`SELECT seq FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).toHaveLength(1);
    // The session holding the journal's locks dies (a restarted database, a dropped connection).
    const holders: { pid: number }[] = await svc.ds.query(`SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1`, [0x570a]);
    expect(holders).toHaveLength(1);
    await svc.ds.query(`SELECT pg_terminate_backend($1)`, [holders[0].pid]);
    // Within the server's check (a second), a FLUSH commits what it was told and the rows with it.
    let cookie = 3;
    const deadline = Date.now() + 10_000;
    for (;;) {
      c.request(WRITE, 100, 6, cookie++, 0, Buffer.from("second"));
      expect(await c.reply()).toMatchObject({ error: 0 });
      c.request(FLUSH, 0, 0, cookie++);
      expect(await c.reply()).toMatchObject({ error: 0 });
      if (!(await svc.ds.query(`SELECT seq FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).length) break;
      if (Date.now() > deadline) throw new Error("FLUSH still journals after the lock was lost");
      await new Promise((r) => setTimeout(r, 200));
    }
    expect((await readDisk(svc, disk, [0, 4])).toString()).toBe("first");
    expect((await readDisk(svc, disk, [100, 105])).toString()).toBe("second");
    c.end();
  });

  it("applies, within its sweep, a journal that no process owns (its writer died) on a disk nobody serves", async () => {
    const disk = await createDisk(svc, "orphan", MiB);
    await writeDisk(svc, disk, Buffer.alloc(MiB, 0x11));
    // What a process that died after a FLUSH leaves behind: rows, and no lock.
    const records = encodeRecords([
      { offset: 10, length: 5, data: Buffer.from("alive") },
      { offset: BLOCK, length: BLOCK, data: null },
    ]);
    await svc.ds.query(`INSERT INTO nbd_journal (disk_id, seq, records) VALUES ($1, 7, $2)`, [uuid(disk), records]);
    const deadline = Date.now() + 20_000;
    while ((await svc.ds.query(`SELECT 1 FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).length) {
      if (Date.now() > deadline) throw new Error("the journal was not applied");
      await new Promise((r) => setTimeout(r, 200));
    }
    const expected = Buffer.alloc(MiB, 0x11);
    expected.write("alive", 10);
    expected.fill(0, BLOCK, 2 * BLOCK);
    expect(sha(await readDisk(svc, disk))).toBe(sha(expected));
  });
});
