import type { DataSource } from "typeorm";
import { migrations } from "../../migrations";
import { createTestDatabase, openTestDataSource, type TestDatabase } from "../helpers/db";

let db: TestDatabase;
let ds: DataSource;
beforeAll(async () => {
  db = await createTestDatabase();
  ds = await openTestDataSource(db.url);
});
afterAll(async () => {
  await ds?.destroy();
  await db?.drop();
});

const TABLES = [
  "api_keys",
  "backup_blocks",
  "backups",
  "clone_manifest_blocks",
  "clone_manifests",
  "disk_blocks",
  "disks",
  "image_blocks",
  "image_disks",
  "image_exports",
  "images",
  "jobs",
  "nbd_exports",
  "nbd_journal",
  "pending_blobs",
  "policies",
  "policy_bindings",
  "policy_runs",
  "projects",
  "servers",
  "staged_blocks",
  "uploads",
  "vault_chunks",
  "vault_packs",
  "volume_segments",
];

const tables = async () => (await ds.query(`SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' AND table_name <> 'migrations' ORDER BY 1`)).map((r: any) => r.table_name);

it("applies every migration and records it", async () => {
  expect(await ds.showMigrations()).toBe(false);
  const applied = await ds.query(`SELECT name FROM migrations ORDER BY id`);
  expect(applied.map((r: any) => r.name)).toEqual(migrations.map((m) => new m().name));
  expect(await tables()).toEqual(TABLES);
});

it("drops backups.expires_at, which nothing set or read", async () => {
  // Backup.expiresAt comes from the policy's retentionDays; a column of it was never written.
  const columns = await ds.query(`SELECT column_name FROM information_schema.columns WHERE table_name = 'backups' AND column_name = 'expires_at'`);
  expect(columns).toEqual([]);
});

it("indexes every foreign key column", async () => {
  // Each FK's leading column must lead some index, or deletes of the parent scan the child.
  const unindexed = await ds.query(`
    SELECT c.conrelid::regclass::text AS tbl, c.conname, a.attname
      FROM pg_constraint c
      JOIN LATERAL unnest(c.conkey) WITH ORDINALITY k(attnum, ord) ON true
      JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
     WHERE c.contype = 'f' AND a.attname <> 'project_id'
       AND NOT EXISTS (
         SELECT 1 FROM pg_index i WHERE i.indrelid = c.conrelid AND i.indkey[0] = a.attnum
       )`);
  expect(unindexed).toEqual([]);
});

it("enforces status values, sizes and attachments in the database", async () => {
  const [{ id: project }] = await ds.query(`INSERT INTO projects (name) VALUES ('m') RETURNING id`);
  await expect(ds.query(`INSERT INTO servers (project_id, name, status, vcpus, memory_mib, os_type) VALUES ($1, 's', 'RUNNING', 1, 1, 'LINUX')`, [project])).rejects.toThrow(/ck_servers_status/);
  await expect(ds.query(`INSERT INTO disks (project_id, name, type, size_bytes, status) VALUES ($1, 'd', 'DATA', 0, 'AVAILABLE')`, [project])).rejects.toThrow(/ck_disks_size/);
  await expect(ds.query(`INSERT INTO disks (project_id, name, type, size_bytes, status, device) VALUES ($1, 'd', 'DATA', 1, 'AVAILABLE', '/dev/vdb')`, [project])).rejects.toThrow(
    /ck_disks_attachment/,
  );
  await expect(ds.query(`INSERT INTO jobs (project_id, type, status, progress) VALUES ($1, 'BACKUP', 'QUEUED', 1.5)`, [project])).rejects.toThrow(/ck_jobs_progress/);
  await expect(ds.query(`INSERT INTO jobs (project_id, type, status) VALUES ($1, 'BACKUP', 'SUCCEEDED')`, [project])).rejects.toThrow(/ck_jobs_finished/);
  await expect(ds.query(`INSERT INTO projects (name) VALUES ('Not Valid')`)).rejects.toThrow(/ck_projects_name/);
});

it("reverts cleanly and applies again", async () => {
  for (let i = 0; i < migrations.length; i++) await ds.undoLastMigration();
  expect(await tables()).toEqual([]);
  await ds.runMigrations();
  expect(await tables()).toEqual(TABLES);
  expect(await ds.showMigrations()).toBe(false);
});
