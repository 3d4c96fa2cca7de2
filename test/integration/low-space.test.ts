import fs from "node:fs";
import path from "node:path";
import { backupNow, bytes, createDisk, putDisk, readDisk, succeed, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

/**
 * The free-space floor on the real file system the blobs live on: a floor of the
 * file system's whole size is always above what it has free.
 */
let svc: TestService;
let blobsDir: string;
let ids: { disk: string; server: string; backup: string; image: string; systemImage: string; upload: string; export: string; policy: string };

const code = (r: { errors?: { extensions?: Record<string, unknown> }[] }) => r.errors?.[0]?.extensions?.code;
const fileSystemSize = () => {
  const st = fs.statfsSync(blobsDir);
  return st.blocks * st.bsize;
};

async function upload(data: Buffer): Promise<Response> {
  return svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(data), headers: { "content-type": "application/octet-stream" } });
}

async function createImage(input: Record<string, unknown>): Promise<string> {
  const r = (await svc.ok(`mutation ($i: CreateImageInput!) { createImage(input: $i) { image { id } job { id } } }`, { i: input })).createImage;
  await succeed(svc, r.job.id);
  return r.image.id;
}

/** Everything a refused request could have changed: rows, disk write versions, and the files under the blobs. */
async function state() {
  const [rows] = await svc.ds.query(`SELECT
    (SELECT count(*)::int FROM servers) AS servers, (SELECT count(*)::int FROM disks) AS disks, (SELECT count(*)::int FROM backups) AS backups,
    (SELECT count(*)::int FROM images) AS images, (SELECT count(*)::int FROM image_exports) AS exports, (SELECT count(*)::int FROM jobs) AS jobs,
    (SELECT count(*)::int FROM uploads) AS uploads, (SELECT count(*)::int FROM policy_runs) AS runs, (SELECT count(*)::int FROM disk_blocks) AS blocks,
    (SELECT count(*)::int FROM volume_segments) AS segments, (SELECT count(*)::int FROM vault_chunks) AS chunks,
    (SELECT coalesce(sum(write_version), 0)::int FROM disks) AS versions,
    (SELECT string_agg(status, ',' ORDER BY id) FROM disks) AS disk_statuses, (SELECT string_agg(status, ',' ORDER BY id) FROM servers) AS server_statuses`);
  const files: string[] = [];
  const walk = (dir: string) => {
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else files.push(`${path.relative(blobsDir, p)} ${fs.statSync(p).size}`);
    }
  };
  walk(blobsDir);
  return { rows, files: files.sort() };
}

beforeAll(async () => {
  svc = await startTestService();
  blobsDir = path.join(svc.dataDir, "blobs");
  const disk = await createDisk(svc, "guarded", 4 * MiB);
  await writeDisk(svc, disk, bytes(2 * MiB, 1));
  const server = (await svc.ok(`mutation { createServer(input: { name: "guarded-server", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${2 * MiB} }) { server { id systemDisk { id } } } }`))
    .createServer.server;
  await writeDisk(svc, server.systemDisk.id, bytes(MiB, 2));
  const backup = await backupNow(svc, disk);
  const image = await createImage({ name: "guarded-img", diskId: disk });
  const systemImage = await createImage({ name: "guarded-system-img", serverId: server.id });
  const up = (await (await upload(bytes(MiB, 3))).json()) as { id: string };
  const exp = (await svc.ok(`mutation ($i: ID!) { exportImage(input: { imageId: $i, format: RAW }) { export { id } job { id } } }`, { i: image })).exportImage;
  await succeed(svc, exp.job.id);
  const policy = (await svc.ok(`mutation { createPolicy(input: { name: "guarded-policy", schedule: ["FREQ=DAILY;BYHOUR=3;BYMINUTE=0"], timezone: "UTC" }) { policy { id } } }`)).createPolicy.policy.id;
  await svc.ok(`mutation ($p: ID!, $r: [ID!]!) { bindPolicy(input: { policyId: $p, resourceIds: $r }) { policy { id } } }`, { p: policy, r: [disk, server.id] });
  ids = { disk, server: server.id, backup, image, systemImage, upload: up.id, export: exp.export.id, policy };
  svc.storage.space.minFreeBytes = fileSystemSize();
});
afterAll(async () => {
  await svc?.stop();
});

describe("below MIN_FREE_BYTES", () => {
  it("answers disk writes and uploads 507 NO_SPACE, and keeps nothing of them", async () => {
    const before = await state();
    const content = await readDisk(svc, ids.disk);
    for (const res of [await putDisk(svc, ids.disk, bytes(64 * 1024, 9)), await putDisk(svc, ids.disk, bytes(100, 9), 4096), await upload(bytes(64 * 1024, 9))]) {
      expect(res.status).toBe(507);
      const body = (await res.json()) as { error: { code: string; message: string } };
      expect(body.error.code).toBe("NO_SPACE");
      expect(body.error.message).toMatch(/less than .* free/);
      expect(body.error.message).not.toContain(svc.dataDir);
    }
    expect((await readDisk(svc, ids.disk)).equals(content)).toBe(true);
    expect(await state()).toEqual(before);
    // What is not a write is answered as before: another project's disk is still 404.
    expect((await putDisk(svc, ids.disk, bytes(100, 9), 0, svc.keys.beta)).status).toBe(404);
  });

  it("refuses every mutation that queues a job writing data with NO_SPACE, and changes nothing", async () => {
    const before = await state();
    const calls: [string, Record<string, unknown>][] = [
      [`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } } }`, { r: ids.disk }],
      [`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } } }`, { r: ids.server }],
      [`mutation ($b: ID!) { restoreBackup(input: { backupId: $b, hydrate: true }) { job { id } } }`, { b: ids.backup }],
      [`mutation ($d: ID!) { createImage(input: { name: "x", diskId: $d }) { image { id } } }`, { d: ids.disk }],
      [`mutation ($b: ID!) { createImage(input: { name: "x", backupId: $b }) { image { id } } }`, { b: ids.backup }],
      [`mutation ($s: ID!) { createImage(input: { name: "x", serverId: $s, type: FULL_SERVER }) { image { id } } }`, { s: ids.server }],
      [`mutation ($u: String!) { importImage(input: { name: "x", uploadId: $u }) { image { id } } }`, { u: ids.upload }],
      [`mutation ($i: ID!) { exportImage(input: { imageId: $i, format: QCOW2 }) { export { id } } }`, { i: ids.image }],
      [`mutation ($i: ID!) { createDisk(input: { name: "x", imageId: $i, hydrate: true }) { disk { id } } }`, { i: ids.image }],
      [`mutation ($b: ID!) { createDisk(input: { name: "x", backupId: $b, hydrate: true }) { disk { id } } }`, { b: ids.backup }],
      [`mutation ($i: ID!) { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, imageId: $i, hydrate: true }) { server { id } } }`, { i: ids.systemImage }],
      [`mutation ($p: ID!) { runPolicy(input: { id: $p }) { run { backupCount } } }`, { p: ids.policy }],
    ];
    for (const [query, variables] of calls) {
      const r = await svc.gql(query, variables);
      expect({ query, code: code(r) }).toEqual({ query, code: "NO_SPACE" });
      expect(r.errors![0].message).toMatch(/less than .* free/);
    }
    expect(await state()).toEqual(before);
    // A request at fault is told so first.
    expect(code(await svc.gql(`mutation { createBackup(input: { resourceId: "nope" }) { backup { id } } }`))).toBe("BAD_USER_INPUT");
    // A disk made from a backup without hydration writes no data: it is made, and its blocks stay in the vault.
    const clone = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "x", backupId: $b }) { disk { id } job { id } } }`, { b: ids.backup })).createDisk;
    expect(clone.job).toBeNull();
    // So does a restore without hydration: the disk reads the backup from the vault at once.
    const restored = (await svc.ok(`mutation ($b: ID!, $d: ID!) { restoreBackup(input: { backupId: $b, targetDiskId: $d }) { job { id } } }`, { b: ids.backup, d: clone.disk.id })).restoreBackup;
    expect((await succeed(svc, restored.job.id)).bytesTotal).toBe(0);
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: clone.disk.id });
  });

  it("a scheduled policy run records every resource as skipped for lack of space", async () => {
    const { nextRunAt } = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Policy { nextRunAt } } }`, { id: ids.policy })).node;
    const jobs = (await state()).rows.jobs;
    const [run] = await svc.scheduler.tick(new Date(new Date(nextRunAt).getTime() + 1000));
    expect(run.backupCount).toBe(0);
    expect(run.skipped.map((s) => s.resourceName).sort()).toEqual(["guarded", "guarded-server"]);
    for (const s of run.skipped) expect(s.reason).toMatch(/less than .* free/);
    expect((await state()).rows.jobs).toBe(jobs);
  });

  it("still reads, verifies and deletes: deletions free space", async () => {
    expect((await readDisk(svc, ids.disk)).length).toBe(4 * MiB);
    const verify = (await svc.ok(`mutation ($b: ID!) { verifyBackup(input: { id: $b }) { job { id } } }`, { b: ids.backup })).verifyBackup;
    await succeed(svc, verify.job.id);
    await svc.ok(`mutation ($id: ID!) { deleteImageExport(input: { id: $id }) { deletedImageExportId } }`, { id: ids.export });
    await svc.ok(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id: ids.image });
    const del = (await svc.ok(`mutation ($b: ID!) { deleteBackup(input: { id: $b }) { job { id } } }`, { b: ids.backup })).deleteBackup;
    await succeed(svc, del.job.id);
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: ids.disk });
    const left = await svc.ok(`query ($d: ID!) { images { totalCount } backups { totalCount } node(id: $d) { id } }`, { d: ids.disk });
    expect(left).toEqual({ images: { totalCount: 1 }, backups: { totalCount: 0 }, node: null });
  });

  it("takes writes and jobs again once the floor is below the free space", async () => {
    svc.storage.space.minFreeBytes = 1;
    const disk = await createDisk(svc, "after", 2 * MiB);
    const res = await putDisk(svc, disk, bytes(MiB, 4));
    expect(res.status).toBe(200);
    await backupNow(svc, disk);
    expect((await upload(bytes(64 * 1024, 5))).status).toBe(201);
  });
});
