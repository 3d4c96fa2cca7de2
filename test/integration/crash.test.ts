/**
 * Kill the process (SIGKILL) in the middle of a backup, start it again: the backup
 * ends ERROR, no job stays RUNNING, every AVAILABLE backup verifies, and the
 * orphaned chunks are reclaimed.
 *
 * The service runs as a real child process (`node bin/stowage.js serve`) on a test
 * database of the shared test cluster, so SIGKILL ends only the Node process: the
 * database lives on, with whatever the dead process committed.
 */
import { spawn, type ChildProcess } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { Client } from "pg";
import { createTestDatabase, type TestDatabase } from "../helpers/db";

const ROOT = path.join(__dirname, "..", "..");
const BIN = path.join(ROOT, "bin", "stowage.js");
const MiB = 2 ** 20;
/** The disk, written in full and backed up once; then its first half changes and the second backup is killed. */
const DISK = 512 * MiB;
const CHANGED = 256 * MiB;
const PIECE = 64 * MiB;

jest.setTimeout(240_000);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Deterministic, incompressible bytes (AES-256-CTR keystream). */
function randomBytes(n: number, seed: string): Buffer {
  const key = crypto.createHash("sha256").update(`crash:${seed}`).digest();
  const cipher = crypto.createCipheriv("aes-256-ctr", key, Buffer.alloc(16));
  return Buffer.concat([cipher.update(Buffer.alloc(n)), cipher.final()]);
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const p = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(p));
    });
  });
}

function within<T>(p: Promise<T>, ms: number, what: () => string): Promise<T> {
  let timer: NodeJS.Timeout;
  return Promise.race([p.finally(() => clearTimeout(timer)), new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what()}`)), ms)))]);
}

interface Served {
  child: ChildProcess;
  url: string;
  output(): string;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

const children = new Set<ChildProcess>();
let db: TestDatabase;
let pg: Client;
let dataDir: string;
let port: number;

/** `stowage serve` on the test database; resolves once it says it serves. */
async function serve(extra: Record<string, string>): Promise<Served> {
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    DATABASE_URL: db.url,
    STOWAGE_DATA_DIR: dataDir,
    HOST: "127.0.0.1",
    PORT: String(port),
    NBD_PORT: "0",
    JOB_STALE_SECONDS: "2",
    ...extra,
  };
  for (const name of ["NODE_ENV", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "S3_BUCKET", "VOLUME_BACKEND", "VAULT_BACKEND", "LOG_LEVEL"]) delete env[name];
  const child = spawn(process.execPath, [BIN, "serve"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  children.add(child);
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  child.stderr!.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => {
      children.delete(child);
      resolve({ code, signal });
    }),
  );
  const url = await within(
    new Promise<string>((resolve, reject) => {
      const check = () => {
        const m = /^Stowage: API (http:\/\/\S+)\/graphql/m.exec(out);
        if (m) resolve(m[1]);
      };
      child.stdout!.on("data", check);
      void exit.then((e) => reject(new Error(`serve exited (${e.code ?? e.signal}) before it was ready:\n${out}`)));
    }),
    60_000,
    () => `serve never became ready:\n${out}`,
  );
  return { child, url, output: () => out, exit };
}

async function gql(svc: Served, key: string, query: string, variables?: Record<string, unknown>): Promise<any> {
  const res = await fetch(`${svc.url}/graphql`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: `Bearer ${key}` },
    body: JSON.stringify({ query, variables }),
  });
  const body = (await res.json()) as { data?: any; errors?: unknown[] };
  if (body.errors?.length) throw new Error(`GraphQL errors: ${JSON.stringify(body.errors)}`);
  return body.data;
}

async function writeDisk(svc: Served, key: string, diskId: string, data: Buffer, offset: number): Promise<void> {
  const res = await fetch(`${svc.url}/v1/disks/${diskId}/data`, {
    method: "PUT",
    headers: { authorization: `Bearer ${key}`, "content-type": "application/octet-stream", "content-range": `bytes ${offset}-${offset + data.length - 1}/*` },
    body: new Uint8Array(data),
  });
  if (res.status !== 200) throw new Error(`PUT failed: ${res.status} ${await res.text()}`);
}

/** SHA-256 of the disk's bytes, read as a stream. */
async function diskSha(svc: Served, key: string, diskId: string): Promise<{ sha: string; bytes: number }> {
  const res = await fetch(`${svc.url}/v1/disks/${diskId}/data`, { headers: { authorization: `Bearer ${key}` } });
  if (res.status !== 200) throw new Error(`GET failed: ${res.status} ${await res.text()}`);
  const hash = crypto.createHash("sha256");
  let bytes = 0;
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    hash.update(chunk);
    bytes += chunk.length;
  }
  return { sha: hash.digest("hex"), bytes };
}

const JOB = `query ($id: ID!) { node(id: $id) { ... on Job { id type status progress bytesDone bytesTotal error { code message } } } }`;
const BACKUP = `query ($id: ID!) { node(id: $id) { ... on Backup { id status completedAt error } } }`;

async function waitJob(svc: Served, key: string, jobId: string, timeoutMs = 120_000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = (await gql(svc, key, JOB, { id: jobId })).node;
    if (["SUCCEEDED", "FAILED", "CANCELLED"].includes(job.status)) return job;
    if (Date.now() > deadline) throw new Error(`job ${jobId} still ${job.status} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

/** Every file under the project's vault packs folder: finished packs by name, and temporary files of unfinished writes. */
function packFiles(projectId: string): { packs: Map<string, number>; temporary: string[] } {
  const root = path.join(dataDir, "blobs", "vault", projectId, "packs");
  const packs = new Map<string, number>();
  const temporary: string[] = [];
  if (!fs.existsSync(root)) return { packs, temporary };
  for (const dir of fs.readdirSync(root)) {
    for (const name of fs.readdirSync(path.join(root, dir))) {
      if (name.startsWith(".tmp")) temporary.push(path.join(dir, name));
      else packs.set(name, fs.statSync(path.join(root, dir, name)).size);
    }
  }
  return { packs, temporary };
}

/** The vault index as the database holds it (set-based: per-chunk subqueries are slow on a fresh, unanalysed database). */
async function vaultIndex(projectId: string) {
  const packs = new Map(
    (await pg.query<{ id: string; size_bytes: string }>(`SELECT id, size_bytes FROM vault_packs WHERE project_id = $1`, [projectId])).rows.map((r) => [r.id, Number(r.size_bytes)]),
  );
  // Hashes some backup names, and hashes an AVAILABLE backup names.
  const sets = `referenced AS (SELECT DISTINCT hash FROM backup_blocks WHERE hash IS NOT NULL),
                live AS (SELECT DISTINCT bb.hash FROM backup_blocks bb JOIN backups b ON b.id = bb.backup_id WHERE b.status = 'AVAILABLE' AND bb.hash IS NOT NULL)`;
  const [chunks] = (
    await pg.query<{ all: string; unreferenced: string; only_unfinished: string }>(
      `WITH ${sets}
       SELECT count(*) AS all, count(*) FILTER (WHERE r.hash IS NULL) AS unreferenced, count(*) FILTER (WHERE l.hash IS NULL) AS only_unfinished
         FROM vault_chunks c LEFT JOIN referenced r ON r.hash = c.hash LEFT JOIN live l ON l.hash = c.hash
        WHERE c.project_id = $1`,
      [projectId],
    )
  ).rows;
  // Packs none of whose chunks an AVAILABLE backup needs: the unfinished backup's.
  const deadPacks = (
    await pg.query<{ id: string }>(
      `WITH ${sets}
       SELECT p.id FROM vault_packs p
        WHERE p.project_id = $1 AND p.id NOT IN (SELECT c.pack_id FROM vault_chunks c JOIN live l ON l.hash = c.hash WHERE c.project_id = $1)`,
      [projectId],
    )
  ).rows.map((r) => r.id);
  return { packs, chunks: { all: Number(chunks.all), unreferenced: Number(chunks.unreferenced), onlyUnfinished: Number(chunks.only_unfinished) }, deadPacks };
}

beforeAll(async () => {
  db = await createTestDatabase();
  pg = new Client({ connectionString: db.url });
  await pg.connect();
  dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-crash-"));
  fs.chmodSync(dataDir, 0o755);
  port = await freePort();
});

afterAll(async () => {
  for (const child of [...children]) {
    const gone = new Promise((r) => child.once("exit", r));
    child.kill("SIGKILL");
    await within(gone, 5_000, () => `child ${child.pid} did not exit on SIGKILL`).catch(() => undefined);
  }
  await pg?.end().catch(() => undefined);
  await db?.drop();
  if (dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
}, 60_000);

it("a backup killed mid-way ends ERROR, its job FAILED (INTERRUPTED), the earlier backup verifies and restores, and GC reclaims the orphans", async () => {
  const timings: Record<string, number> = {};
  let t = Date.now();
  const lap = (name: string) => {
    timings[name] = Date.now() - t;
    t = Date.now();
  };

  // 1. First life: a disk full of random data, one complete backup, then a second one killed half-way.
  const first = await serve({ GC_INTERVAL_SECONDS: "0" });
  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  const [{ id: projectId }] = (await pg.query<{ id: string }>(`SELECT id FROM projects WHERE name = 'default'`)).rows;
  lap("start");

  const diskId = (await gql(first, key, `mutation ($s: SafeInt!) { createDisk(input: { name: "crash-disk", sizeBytes: $s }) { disk { id } } }`, { s: DISK })).createDisk.disk.id;
  const original = crypto.createHash("sha256");
  for (let off = 0; off < DISK; off += PIECE) {
    const piece = randomBytes(PIECE, `v1:${off}`);
    original.update(piece);
    await writeDisk(first, key, diskId, piece, off);
  }
  const originalSha = original.digest("hex");
  lap("write");

  const createBackup = `mutation ($r: ID!, $n: String) { createBackup(input: { resourceId: $r, name: $n }) { backup { id } job { id } } }`;
  const b1 = (await gql(first, key, createBackup, { r: diskId, n: "complete" })).createBackup;
  const j1 = await waitJob(first, key, b1.job.id);
  expect(j1.status).toBe("SUCCEEDED");
  lap("backup1");

  for (let off = 0; off < CHANGED; off += PIECE) await writeDisk(first, key, diskId, randomBytes(PIECE, `v2:${off}`), off);
  lap("change");

  const b2 = (await gql(first, key, createBackup, { r: diskId, n: "killed" })).createBackup;
  // Kill it once it has done a good share of the work but not all of it: packs of it are in the vault.
  let seen: any;
  for (const deadline = Date.now() + 60_000; ;) {
    seen = (await gql(first, key, JOB, { id: b2.job.id })).node;
    if (seen.status === "RUNNING" && seen.bytesDone > 0 && seen.progress >= 0.25) break;
    if (seen.status !== "QUEUED" && seen.status !== "RUNNING") throw new Error(`the second backup ended (${seen.status}) before it could be killed`);
    if (Date.now() > deadline) throw new Error(`the second backup never got going: ${JSON.stringify(seen)}`);
    await sleep(20);
  }
  first.child.kill("SIGKILL");
  const died = await within(first.exit, 10_000, () => "the service did not die on SIGKILL");
  expect(died.signal).toBe("SIGKILL");
  lap("backup2-until-kill");
  expect(seen.progress).toBeLessThan(1);
  expect(seen.bytesTotal).toBe(CHANGED);

  // 2. The wreck: a job still RUNNING, a backup CREATING, and vault packs only that backup needs.
  const [{ status: jobAtDeath }] = (await pg.query(`SELECT status FROM jobs WHERE id = (SELECT job_id FROM backups WHERE name = 'killed')`)).rows;
  const [{ status: backupAtDeath }] = (await pg.query(`SELECT status FROM backups WHERE name = 'killed'`)).rows;
  expect(jobAtDeath).toBe("RUNNING");
  expect(backupAtDeath).toBe("CREATING");
  const wreckFiles = packFiles(projectId);
  const wreck = await vaultIndex(projectId);
  const unindexedFiles = [...wreckFiles.packs.keys()].filter((id) => !wreck.packs.has(id));
  const orphanFiles = [...new Set([...unindexedFiles, ...wreck.deadPacks])];
  // Orphans to reclaim: chunks only the unfinished backup names, in packs no complete backup needs.
  expect(wreck.chunks.onlyUnfinished).toBeGreaterThan(0);
  expect(orphanFiles.length).toBeGreaterThan(0);
  for (const id of wreck.deadPacks) expect(wreckFiles.packs.has(id)).toBe(true);

  // 3. Second life, garbage collection every second with no grace.
  const second = await serve({ GC_INTERVAL_SECONDS: "1", GC_GRACE_SECONDS: "0" });
  lap("restart");

  const job2 = (await gql(second, key, JOB, { id: b2.job.id })).node;
  expect(job2.status).toBe("FAILED");
  expect(job2.error.code).toBe("INTERRUPTED");
  const backup2 = (await gql(second, key, BACKUP, { id: b2.backup.id })).node;
  expect(backup2.status).toBe("ERROR");
  expect(backup2.completedAt).toBeNull();
  const backup1 = (await gql(second, key, BACKUP, { id: b1.backup.id })).node;
  expect(backup1.status).toBe("AVAILABLE");
  expect((await pg.query(`SELECT id FROM jobs WHERE status = 'RUNNING'`)).rows).toEqual([]);
  expect((await pg.query(`SELECT id FROM backups WHERE status = 'CREATING'`)).rows).toEqual([]);

  // 4. Garbage collection reclaims the orphans: every pack file is indexed, every chunk referenced.
  let files = packFiles(projectId);
  let index = await vaultIndex(projectId);
  const reclaimed = () =>
    files.temporary.length === 0 && [...files.packs.keys()].every((id) => index.packs.has(id)) && index.chunks.unreferenced === 0 && orphanFiles.every((id) => !files.packs.has(id));
  for (const deadline = Date.now() + 30_000; !reclaimed();) {
    if (Date.now() > deadline) {
      throw new Error(
        `garbage collection did not reclaim the orphans: ${JSON.stringify({ temporary: files.temporary, unindexed: [...files.packs.keys()].filter((id) => !index.packs.has(id)), chunks: index.chunks, orphansLeft: orphanFiles.filter((id) => files.packs.has(id)) })}\n${second.output()}`,
      );
    }
    await sleep(200);
    files = packFiles(projectId);
    index = await vaultIndex(projectId);
  }
  lap("gc");
  expect(files.temporary).toEqual([]);
  expect([...files.packs.keys()].sort()).toEqual([...index.packs.keys()].sort());
  for (const [id, size] of index.packs) expect(files.packs.get(id)).toBe(size);
  expect(index.chunks.unreferenced).toBe(0);
  expect(index.chunks.onlyUnfinished).toBe(0);
  expect(index.deadPacks).toEqual([]);
  // Nothing of the killed backup is left, neither its blocks nor its chunks.
  expect((await pg.query(`SELECT 1 FROM backup_blocks WHERE backup_id = (SELECT id FROM backups WHERE name = 'killed')`)).rows).toEqual([]);
  expect(index.chunks.all).toBeLessThan(wreck.chunks.all);

  // 5. The complete backup verifies: every chunk it needs is there and hashes right.
  const verify = (await gql(second, key, `mutation ($id: ID!) { verifyBackup(input: { id: $id }) { job { id } } }`, { id: b1.backup.id })).verifyBackup.job.id;
  const verified = await waitJob(second, key, verify);
  expect(verified).toMatchObject({ status: "SUCCEEDED", error: null });
  lap("verify");

  // 6. A third life, after a clean stop, with garbage collection every second but a sane grace: the complete
  //    backup restores the disk to exactly its bytes. (Not under GC_GRACE_SECONDS=0: that grace lets the
  //    collector delete a segment the restore has just written and is about to commit.)
  second.child.kill("SIGTERM");
  expect((await within(second.exit, 20_000, () => `no exit after SIGTERM:\n${second.output()}`)).code).toBe(0);
  const third = await serve({ GC_INTERVAL_SECONDS: "1", GC_GRACE_SECONDS: "60" });
  lap("restart2");
  expect((await pg.query(`SELECT id FROM jobs WHERE status IN ('RUNNING', 'QUEUED')`)).rows).toEqual([]);
  const restore = (await gql(third, key, `mutation ($b: ID!) { restoreBackup(input: { backupId: $b, hydrate: true }) { job { id } } }`, { b: b1.backup.id })).restoreBackup.job.id;
  const restored = await waitJob(third, key, restore);
  expect(restored).toMatchObject({ status: "SUCCEEDED", error: null });
  expect(restored.bytesTotal).toBe(CHANGED); // only the blocks that differ
  const after = await diskSha(third, key, diskId);
  expect(after.bytes).toBe(DISK);
  expect(after.sha).toBe(originalSha);
  lap("restore");

  // Every AVAILABLE backup was verified: the one complete backup is the only one.
  const available = (await pg.query(`SELECT name FROM backups WHERE status = 'AVAILABLE' ORDER BY name`)).rows.map((r) => r.name);
  expect(available).toEqual(["complete"]);

  console.info(
    `crash: killed at progress ${seen.progress.toFixed(3)} with ${wreck.chunks.onlyUnfinished} orphan chunks in ${orphanFiles.length} packs (${unindexedFiles.length} unindexed, ${wreckFiles.temporary.length} temporary files); ` +
      `timings ms ${JSON.stringify(timings)}`,
  );
});

it("SIGTERM while jobs run ends the service within 10 s: the jobs end INTERRUPTED, nothing is left half made, and the next start runs them again", async () => {
  // What the test before left running stops first.
  for (const child of [...children]) {
    child.kill("SIGTERM");
    await within(new Promise((r) => child.once("exit", r)), 20_000, () => `child ${child.pid} did not exit on SIGTERM`);
  }
  const svc = await serve({ GC_INTERVAL_SECONDS: "0", JOB_CONCURRENCY: "2" });
  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  const size = 768 * MiB;
  const diskId = (await gql(svc, key, `mutation ($s: SafeInt!) { createDisk(input: { name: "sigterm-disk", sizeBytes: $s }) { disk { id } } }`, { s: size })).createDisk.disk.id;
  for (let off = 0; off < size; off += PIECE) await writeDisk(svc, key, diskId, randomBytes(PIECE, `term:${off}`), off);

  const b = (await gql(svc, key, `mutation ($r: ID!) { createBackup(input: { resourceId: $r, name: "terminated" }) { backup { id } job { id } } }`, { r: diskId })).createBackup;
  const img = (await gql(svc, key, `mutation ($d: ID!) { createImage(input: { name: "terminated", diskId: $d }) { image { id } job { id } } }`, { d: diskId })).createImage;
  // Both have moved bytes: the signal lands in the middle of their copy loops.
  for (;;) {
    const jobs = await Promise.all([b.job.id, img.job.id].map(async (id) => (await gql(svc, key, JOB, { id })).node));
    if (jobs.every((j) => j.status === "RUNNING" && j.bytesDone > 0)) break;
    if (jobs.some((j) => !["QUEUED", "RUNNING"].includes(j.status))) throw new Error(`a job ended before the signal: ${JSON.stringify(jobs)}`);
    await sleep(20);
  }
  const sent = Date.now();
  svc.child.kill("SIGTERM");
  const exit = await within(svc.exit, 10_000, () => `no exit within 10 s of SIGTERM:\n${svc.output()}`);
  expect({ code: exit.code, ms: Date.now() - sent < 10_000 }).toEqual({ code: 0, ms: true });

  const rows = async (sql: string) => (await pg.query(sql)).rows;
  const terminated = `backup_id IN (SELECT id FROM backups WHERE name = 'terminated') OR image_id IN (SELECT id FROM images WHERE name = 'terminated')`;
  expect(await rows(`SELECT type, status, error_code FROM jobs WHERE ${terminated} ORDER BY type`)).toEqual([
    { type: "BACKUP", status: "FAILED", error_code: "INTERRUPTED" },
    { type: "CREATE_IMAGE", status: "FAILED", error_code: "INTERRUPTED" },
  ]);
  expect(await rows(`SELECT status FROM backups WHERE name = 'terminated'`)).toEqual([{ status: "ERROR" }]);
  expect(await rows(`SELECT status, error_code FROM images WHERE name = 'terminated'`)).toEqual([{ status: "KILLED", error_code: "INTERRUPTED" }]);

  // The next start takes the same work and finishes it.
  const again = await serve({ GC_INTERVAL_SECONDS: "0" });
  const b2 = (await gql(again, key, `mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { job { id } } }`, { r: diskId })).createBackup;
  expect(await waitJob(again, key, b2.job.id)).toMatchObject({ status: "SUCCEEDED", bytesTotal: size });
});

it("a worker frozen while another fails its job commits nothing when it wakes: the job stays FAILED and the backup ERROR", async () => {
  for (const child of [...children]) {
    child.kill("SIGTERM");
    await within(new Promise((r) => child.once("exit", r)), 20_000, () => `child ${child.pid} did not exit on SIGTERM`);
  }
  const frozen = await serve({ GC_INTERVAL_SECONDS: "0", JOB_CONCURRENCY: "1" });
  const key = fs.readFileSync(path.join(dataDir, "default-api-key"), "utf8").trim();
  const size = 512 * MiB;
  const diskId = (await gql(frozen, key, `mutation ($s: SafeInt!) { createDisk(input: { name: "fenced-disk", sizeBytes: $s }) { disk { id } } }`, { s: size })).createDisk.disk.id;
  for (let off = 0; off < size; off += PIECE) await writeDisk(frozen, key, diskId, randomBytes(PIECE, `fence:${off}`), off);
  const b = (await gql(frozen, key, `mutation ($r: ID!) { createBackup(input: { resourceId: $r, name: "fenced" }) { backup { id } job { id } } }`, { r: diskId })).createBackup;
  for (;;) {
    const j = (await gql(frozen, key, JOB, { id: b.job.id })).node;
    if (j.status === "RUNNING" && j.bytesDone > 0) break;
    if (!["QUEUED", "RUNNING"].includes(j.status)) throw new Error(`the backup ended before the freeze: ${JSON.stringify(j)}`);
    await sleep(20);
  }
  frozen.child.kill("SIGSTOP");

  // Another process finds the job silent and fails it, with its cleanup: the backup is ERROR.
  const env: NodeJS.ProcessEnv = { ...process.env, DATABASE_URL: db.url, STOWAGE_DATA_DIR: dataDir, JOB_STALE_SECONDS: "2", GC_INTERVAL_SECONDS: "0", SCHEDULER_INTERVAL_SECONDS: "0" };
  for (const name of ["NODE_ENV", "STOWAGE_TEST_ADMIN_URL", "STOWAGE_DIST", "LOG_LEVEL"]) delete env[name];
  const other = spawn(process.execPath, [BIN, "worker"], { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  children.add(other);
  other.once("exit", () => children.delete(other));
  const state = async () => (await pg.query(`SELECT j.status AS job, j.error_code AS code, b.status AS backup FROM jobs j JOIN backups b ON b.id = j.backup_id WHERE b.name = 'fenced'`)).rows[0];
  // It fails the job, then cleans up in a second step: wait for both.
  const failedAndCleaned = async () => {
    const now = await state();
    return now.job !== "RUNNING" && now.backup !== "CREATING";
  };
  for (const deadline = Date.now() + 60_000; !(await failedAndCleaned()); await sleep(200)) {
    if (Date.now() > deadline) throw new Error("the other process never failed the silent job");
  }
  expect(await state()).toEqual({ job: "FAILED", code: "INTERRUPTED", backup: "ERROR" });

  // The frozen process wakes up in the middle of its copy and goes on: it must commit nothing.
  frozen.child.kill("SIGCONT");
  await within(
    (async () => {
      while (!/lost its claim/.test(frozen.output())) await sleep(100);
    })(),
    60_000,
    () => `the woken process never noticed it lost the job:\n${frozen.output()}`,
  );
  await sleep(1000);
  expect(await state()).toEqual({ job: "FAILED", code: "INTERRUPTED", backup: "ERROR" });
  expect((await pg.query(`SELECT count(*)::int AS n FROM backup_blocks WHERE backup_id = (SELECT id FROM backups WHERE name = 'fenced')`)).rows[0].n).toBe(0);
});
