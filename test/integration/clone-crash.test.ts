/**
 * A disk made from a backup, hydrating when its process is killed: it stays whole (what
 * was copied is its own, the rest still reads from the vault) and hydrating it again
 * finishes the work.
 */
import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import { bytes } from "../helpers/data";
import { gqlAt, serveChild, type ChildService } from "../helpers/child-service";
import { createTestDatabase, type TestDatabase } from "../helpers/db";
import { MiB } from "../helpers/service";

jest.setTimeout(240_000);

const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];
const SIZE = 512 * MiB;
const DATA = 384 * MiB;

describe("a hydration killed half way", () => {
  let db: TestDatabase;
  let dataDir: string;
  const children: ChildService[] = [];
  beforeAll(async () => {
    db = await createTestDatabase();
    dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-hydrate-crash-"));
  });
  afterAll(async () => {
    for (const c of children) await c.kill();
    await db?.drop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  });

  it("leaves the disk whole and reading its backup's bytes, and hydrating it again finishes", async () => {
    const env = { DATABASE_URL: db.url, STOWAGE_DATA_DIR: dataDir, STOWAGE_DIST: "1" };
    const first = await serveChild(env, 180_000);
    children.push(first);
    const key = first.defaultKey();
    const ok = async (url: string, query: string, variables?: Record<string, unknown>) => {
      const r = await gqlAt(url, key, query, variables);
      if (r.errors) throw new Error(JSON.stringify(r.errors));
      return r.data;
    };
    const waitJob = async (url: string, id: string) => {
      for (;;) {
        const job = (await ok(url, `query ($id: ID!) { node(id: $id) { ... on Job { status error { code } } } }`, { id })).node;
        if (["SUCCEEDED", "FAILED", "CANCELLED"].includes(job.status)) return job;
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    const digest = async (url: string, disk: string) => {
      const res = await fetch(`${url}/v1/disks/${encodeURIComponent(disk)}/data`, { headers: { authorization: `Bearer ${key}` } });
      expect(res.status).toBe(200);
      const hash = crypto.createHash("sha256");
      for await (const piece of res.body as unknown as AsyncIterable<Uint8Array>) hash.update(piece);
      return hash.digest("hex");
    };

    const source = (await ok(first.url, `mutation { createDisk(input: { name: "src", sizeBytes: ${SIZE} }) { disk { id } } }`)).createDisk.disk.id;
    const data = bytes(DATA, 5);
    const put = await fetch(`${first.url}/v1/disks/${encodeURIComponent(source)}/data`, {
      method: "PUT",
      headers: { authorization: `Bearer ${key}`, "content-type": "application/octet-stream", "content-range": `bytes 0-${DATA - 1}/*` },
      body: new Uint8Array(data),
    });
    expect(put.status).toBe(200);
    const backup = (await ok(first.url, `mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: source })).createBackup;
    expect((await waitJob(first.url, backup.job.id)).status).toBe("SUCCEEDED");
    const expected = crypto
      .createHash("sha256")
      .update(Buffer.concat([data, Buffer.alloc(SIZE - DATA)]))
      .digest("hex");

    const pg = new Client({ connectionString: db.url });
    await pg.connect();
    try {
      const made = (await ok(first.url, `mutation ($b: ID!) { createDisk(input: { name: "clone", backupId: $b, hydrate: true }) { disk { id } job { id } } }`, { b: backup.backup.id })).createDisk;
      // Killed once some of its blocks are its own, before all of them are.
      let local = 0;
      for (let i = 0; i < 20_000 && local === 0; i++) {
        local = Number((await pg.query(`SELECT count(*) AS n FROM disk_blocks WHERE disk_id = $1`, [uuid(made.disk.id)])).rows[0].n);
      }
      await first.kill();
      expect(local).toBeGreaterThan(0);
      const atKill = Number((await pg.query(`SELECT count(*) AS n FROM disk_blocks WHERE disk_id = $1`, [uuid(made.disk.id)])).rows[0].n);
      expect(atKill).toBeLessThan(DATA / (64 * 1024));

      const second = await serveChild(env, 180_000);
      children.push(second);
      const job = await waitJob(second.url, made.job.id);
      expect(job).toMatchObject({ status: "FAILED", error: { code: "INTERRUPTED" } });
      const state = (await ok(second.url, `query ($id: ID!) { node(id: $id) { ... on Disk { status hydration { bytesInVault bytesLocal } } } }`, { id: made.disk.id })).node;
      expect(state.status).toBe("AVAILABLE");
      expect(state.hydration.bytesLocal).toBe(atKill * 64 * 1024);
      expect(state.hydration.bytesLocal + state.hydration.bytesInVault).toBe(DATA);
      expect(await digest(second.url, made.disk.id)).toBe(expected);

      const again = (await ok(second.url, `mutation ($id: ID!) { hydrateDisk(input: { id: $id }) { job { id } } }`, { id: made.disk.id })).hydrateDisk.job.id;
      expect((await waitJob(second.url, again)).status).toBe("SUCCEEDED");
      const after = (await ok(second.url, `query ($id: ID!) { node(id: $id) { ... on Disk { hydration { bytesInVault bytesLocal } } } }`, { id: made.disk.id })).node;
      expect(after.hydration).toEqual({ bytesInVault: 0, bytesLocal: DATA });
      expect(await digest(second.url, made.disk.id)).toBe(expected);
    } finally {
      await pg.end();
    }
  });
});
