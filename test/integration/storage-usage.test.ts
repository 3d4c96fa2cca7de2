import fs from "node:fs";
import path from "node:path";
import { collectAllGarbage } from "../../src/jobs";
import { silentLogger } from "../../src/logger";
import { exportKey } from "../../src/storage/uploads";
import { backupNow, BLOCK, bytes, createDisk, succeed, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const code = (r: { errors?: { extensions?: Record<string, unknown> }[] }) => r.errors?.[0]?.extensions?.code;
const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];
const STORAGE = `{ viewer { storage { diskBytes backupCount imageCount logicalBytes storedBytes dedupRatio vaultBytes exportBytes uploadBytes } } }`;
const storage = async (key?: string) => (await svc.ok(STORAGE, {}, key)).viewer.storage;

/** Bytes of the files under the project's part of the vault, as the file system has them. */
function packFileBytes(projectId: string): number {
  let total = 0;
  const walk = (dir: string) => {
    if (!fs.existsSync(dir)) return;
    for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
      if (e.isDirectory()) walk(path.join(dir, e.name));
      else if (!e.name.startsWith(".tmp")) total += fs.statSync(path.join(dir, e.name)).size;
    }
  };
  walk(path.join(svc.dataDir, "blobs", "vault", projectId));
  return total;
}

async function createImage(input: Record<string, unknown>): Promise<string> {
  const r = (await svc.ok(`mutation ($i: CreateImageInput!) { createImage(input: $i) { image { id } job { id } } }`, { i: input })).createImage;
  await succeed(svc, r.job.id);
  return r.image.id;
}

async function startExport(imageId: string, format = "RAW"): Promise<{ id: string; jobId: string }> {
  const r = (await svc.ok(`mutation ($i: ID!, $f: DiskFormat!) { exportImage(input: { imageId: $i, format: $f }) { export { id } job { id } } }`, { i: imageId, f: format })).exportImage;
  return { id: r.export.id, jobId: r.job.id };
}

async function exportNow(imageId: string, format = "RAW"): Promise<string> {
  const e = await startExport(imageId, format);
  await succeed(svc, e.jobId);
  return e.id;
}

const exportFile = (exportId: string) => svc.storage.uploads.blobs.stat(exportKey(svc.projectIds.alpha, uuid(exportId)));
const deleteExport = (id: string, key?: string) => svc.gql(`mutation ($id: ID!) { deleteImageExport(input: { id: $id }) { deletedImageExportId } }`, { id }, key);

describe("viewer storage", () => {
  it("counts backups and images as logical bytes against the vault's distinct chunks: an image of a backed-up disk adds logical bytes, not stored ones", async () => {
    expect(await storage()).toEqual({ diskBytes: 0, backupCount: 0, imageCount: 0, logicalBytes: 0, storedBytes: 0, dedupRatio: 1, vaultBytes: 0, exportBytes: 0, uploadBytes: 0 });
    const disk = await createDisk(svc, "accounted", 16 * MiB);
    // 3 MiB random, then text that compresses well: 48 + 22 written blocks.
    await writeDisk(svc, disk, Buffer.concat([bytes(3 * MiB, 1), Buffer.from("stowage keeps this\n".repeat(75_000))]));
    const written = 48 + Math.ceil((19 * 75_000) / BLOCK);
    await backupNow(svc, disk);
    const afterBackup = await storage();
    expect(afterBackup).toMatchObject({ diskBytes: written * BLOCK, backupCount: 1, imageCount: 0, logicalBytes: written * BLOCK });
    // What the vault stores: every chunk once, compressed; the pack files hold exactly them.
    const [{ chunks }] = await svc.ds.query(`SELECT coalesce(sum(stored_size), 0)::bigint AS chunks FROM vault_chunks WHERE project_id = $1`, [svc.projectIds.alpha]);
    expect(afterBackup.storedBytes).toBe(Number(chunks));
    expect(afterBackup.storedBytes).toBeGreaterThan(3 * MiB);
    expect(afterBackup.storedBytes).toBeLessThan(written * BLOCK);
    expect(afterBackup.vaultBytes).toBe(packFileBytes(svc.projectIds.alpha));
    expect(afterBackup.dedupRatio).toBeCloseTo((written * BLOCK) / afterBackup.storedBytes, 9);

    // An image of the same disk: as much logical data again, no new chunk.
    const image = await createImage({ name: "accounted-img", diskId: disk });
    const afterImage = await storage();
    expect(afterImage).toMatchObject({ backupCount: 1, imageCount: 1, logicalBytes: 2 * written * BLOCK, storedBytes: afterBackup.storedBytes, vaultBytes: afterBackup.vaultBytes });
    expect(afterImage.dedupRatio).toBeCloseTo((2 * written * BLOCK) / afterBackup.storedBytes, 9);
    expect(afterImage.dedupRatio).toBeGreaterThan(2 * afterBackup.dedupRatio - 1e-9);

    // New data in a second backup adds what changed, both logical and stored.
    await writeDisk(svc, disk, bytes(2 * BLOCK, 2), 10 * MiB);
    await backupNow(svc, disk);
    const afterSecond = await storage();
    expect(afterSecond.backupCount).toBe(2);
    expect(afterSecond.logicalBytes).toBe(2 * written * BLOCK + (written + 2) * BLOCK);
    expect(afterSecond.storedBytes).toBeGreaterThan(afterBackup.storedBytes + 2 * BLOCK - 1);
    expect(afterSecond.storedBytes).toBeLessThan(afterBackup.storedBytes + 2 * BLOCK + 1024);

    // Exports and uploads are files beside the vault, counted on their own.
    const exp = await exportNow(image);
    const up = (await (await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(bytes(MiB + 7, 3)) })).json()) as { sizeBytes: number };
    const withFiles = await storage();
    expect(withFiles).toMatchObject({ exportBytes: 16 * MiB, uploadBytes: MiB + 7, storedBytes: afterSecond.storedBytes, logicalBytes: afterSecond.logicalBytes });
    expect(up.sizeBytes).toBe(MiB + 7);

    // Another project sees none of it.
    expect(await storage(svc.keys.beta)).toMatchObject({ backupCount: 0, imageCount: 0, logicalBytes: 0, storedBytes: 0, vaultBytes: 0, exportBytes: 0, uploadBytes: 0 });

    // Deleting the image takes its logical bytes and its export with it; its chunks stay, the backups hold them.
    await svc.ok(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id: image });
    expect(await exportFile(exp)).toBeNull();
    expect(await storage()).toMatchObject({ imageCount: 0, logicalBytes: (written + written + 2) * BLOCK, storedBytes: afterSecond.storedBytes, exportBytes: 0 });
  });
});

describe("deleteImageExport", () => {
  let image: string;
  beforeAll(async () => {
    const disk = await createDisk(svc, "exported", 4 * MiB);
    await writeDisk(svc, disk, bytes(MiB, 5), 64 * 1024);
    image = await createImage({ name: "exported-img", diskId: disk });
  });

  it("deletes the export and its file now, not at expiry; another project's export is NOT_FOUND", async () => {
    const exp = await exportNow(image, "QCOW2");
    expect(await exportFile(exp)).not.toBeNull();
    expect((await svc.http(`/v1/exports/${exp}/file`)).status).toBe(200);
    const exportBytes = (await storage()).exportBytes;

    const foreign = await deleteExport(exp, svc.keys.beta);
    expect(code(foreign)).toBe("NOT_FOUND");
    expect(await exportFile(exp)).not.toBeNull();

    const r = await svc.ok(`mutation ($id: ID!) { deleteImageExport(input: { id: $id }) { deletedImageExportId } }`, { id: exp });
    expect(r.deleteImageExport.deletedImageExportId).toBe(exp);
    expect(await exportFile(exp)).toBeNull();
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { id } }`, { id: exp })).node).toBeNull();
    expect((await svc.http(`/v1/exports/${exp}/file`)).status).toBe(404);
    const img = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Image { status exports { totalCount } } } }`, { id: image })).node;
    expect(img).toEqual({ status: "ACTIVE", exports: { totalCount: 0 } });
    expect((await storage()).exportBytes).toBeLessThan(exportBytes);
    expect(code(await deleteExport(exp))).toBe("NOT_FOUND");
    expect(code(await deleteExport(image))).toBe("BAD_USER_INPUT");
  });

  it("refuses an export still being written (CONFLICT), as deleteImage does, and deletes it once written", async () => {
    await svc.runner.stop();
    let queued!: { id: string; jobId: string };
    try {
      queued = await startExport(image);
      const r = await deleteExport(queued.id);
      expect(code(r)).toBe("CONFLICT");
      expect(r.errors![0].message).toMatch(/cancel its job first/);
      expect(code(await svc.gql(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id: image }))).toBe("CONFLICT");
    } finally {
      await svc.runner.start();
    }
    await succeed(svc, queued.jobId);
    expect(await exportFile(queued.id)).not.toBeNull();
    await svc.ok(`mutation ($id: ID!) { deleteImageExport(input: { id: $id }) { deletedImageExportId } }`, { id: queued.id });
    expect(await exportFile(queued.id)).toBeNull();
  });

  it("deletes an expired export, whose file garbage collection already removed", async () => {
    const exp = await exportNow(image);
    await svc.ds.query(`UPDATE image_exports SET expires_at = now() - interval '1 second' WHERE id = $1`, [uuid(exp)]);
    await collectAllGarbage(svc.ds, svc.storage, 3600_000, silentLogger);
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on ImageExport { status } } }`, { id: exp })).node.status).toBe("EXPIRED");
    expect(await exportFile(exp)).toBeNull();
    await svc.ok(`mutation ($id: ID!) { deleteImageExport(input: { id: $id }) { deletedImageExportId } }`, { id: exp });
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { id } }`, { id: exp })).node).toBeNull();
  });

  it("deleting an image deletes its exports' files at once", async () => {
    const disk = await createDisk(svc, "exported-twice", 2 * MiB);
    await writeDisk(svc, disk, bytes(MiB, 6));
    const img = await createImage({ name: "exported-twice-img", diskId: disk });
    const files = [await exportNow(img, "RAW"), await exportNow(img, "VHD")];
    for (const f of files) expect(await exportFile(f)).not.toBeNull();
    await svc.ok(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id: img });
    for (const f of files) expect(await exportFile(f)).toBeNull();
    const [{ n }] = await svc.ds.query(`SELECT count(*)::int AS n FROM image_exports WHERE id = ANY($1)`, [files.map(uuid)]);
    expect(n).toBe(0);
  });
});
