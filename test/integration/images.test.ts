import { execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { contentChecksum } from "../helpers/checksum";
import { backupNow, bytes, readDisk, sha, succeed, waitJob, writeDisk } from "../helpers/data";
import { imageDiskBlocks } from "../../src/jobs/handlers/image.handler";
import { fromGlobalId } from "../../src/services/global-id";
import { qemuImg, tmpDir } from "../helpers/formats";
import { MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const code = (r: { errors?: { extensions?: Record<string, unknown> }[] }) => r.errors?.[0]?.extensions?.code;
const IMAGE = `query ($id: ID!) { node(id: $id) { ... on Image {
  id name type status source osType minDiskBytes virtualSizeBytes sizeBytes checksum exportable error { code message }
  sourceServer { id } sourceDisk { id } sourceBackup { id } servers { totalCount } disks { totalCount }
} } }`;
const image = async (id: string) => (await svc.ok(IMAGE, { id })).node;

async function server(name: string, dataDisks: number[] = [], osType = "LINUX") {
  return (
    await svc.ok(
      `mutation ($n: String!, $d: [DataDiskInput!], $os: OsType) { createServer(input: { name: $n, vcpus: 1, memoryMiB: 512, osType: $os, systemDiskSizeBytes: ${8 * MiB}, dataDisks: $d }) {
        server { id disks { nodes { id type device } } } } }`,
      { n: name, d: dataDisks.map((s) => ({ sizeBytes: s })), os: osType },
    )
  ).createServer.server;
}

async function createImage(input: Record<string, unknown>) {
  const r = (await svc.ok(`mutation ($i: CreateImageInput!) { createImage(input: $i) { image { id status } job { id } } }`, { i: input })).createImage;
  await succeed(svc, r.job.id);
  return r.image.id as string;
}

async function upload(file: Buffer): Promise<{ id: string; sizeBytes: number; sha256: string }> {
  const res = await svc.http("/v1/uploads", { method: "POST", body: new Uint8Array(file), headers: { "content-type": "application/octet-stream" } });
  expect(res.status).toBe(201);
  return (await res.json()) as { id: string; sizeBytes: number; sha256: string };
}

async function importImage(input: Record<string, unknown>) {
  const r = await svc.gql(`mutation ($i: ImportImageInput!) { importImage(input: $i) { image { id status } job { id } } }`, { i: input });
  return r;
}

async function exportImage(imageId: string, format: string): Promise<{ file: Buffer; exp: any }> {
  const r = (await svc.ok(`mutation ($i: ID!, $f: DiskFormat!) { exportImage(input: { imageId: $i, format: $f }) { export { id status } job { id } } }`, { i: imageId, f: format })).exportImage;
  await succeed(svc, r.job.id);
  const exp = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on ImageExport { id status format sizeBytes sha256 downloadUrl image { id } } } }`, { id: r.export.id })).node;
  const res = await svc.http(exp.downloadUrl);
  expect(res.status).toBe(200);
  const file = Buffer.from(await res.arrayBuffer());
  return { file, exp };
}

describe("images of servers, disks and backups", () => {
  it("makes a SYSTEM_DISK image of a server, then servers from it that hold exactly its bytes", async () => {
    const s = await server("golden", [], "WINDOWS");
    const sys = s.disks.nodes[0].id;
    await writeDisk(svc, sys, Buffer.concat([bytes(MiB, 1), Buffer.from("compressible text\n".repeat(100_000))]));
    const raw = await readDisk(svc, sys);
    const id = await createImage({ name: "golden-img", serverId: s.id });
    const img = await image(id);
    expect(img).toMatchObject({
      type: "SYSTEM_DISK",
      status: "ACTIVE",
      source: "SERVER",
      osType: "WINDOWS",
      virtualSizeBytes: 8 * MiB,
      minDiskBytes: 8 * MiB,
      exportable: true,
      sourceServer: { id: s.id },
    });
    expect(img.checksum).toBe(contentChecksum(raw));
    // Compressed: smaller than the data it holds.
    expect(img.sizeBytes).toBeLessThan(MiB + 1_800_000);

    const made = (
      await svc.ok(
        `mutation ($i: ID!) { createServer(input: { name: "clone", vcpus: 1, memoryMiB: 512, imageId: $i, systemDiskSizeBytes: ${16 * MiB} }) {
      server { id status osType sourceImage { id } systemDisk { id sizeBytes sourceImage { id } } } job { id } } }`,
        { i: id },
      )
    ).createServer;
    // Ready at once: its system disk reads from the image in the vault until written.
    expect(made.server).toMatchObject({ status: "ACTIVE", osType: "WINDOWS", sourceImage: { id }, systemDisk: { sizeBytes: 16 * MiB, sourceImage: { id } } });
    expect(made.job).toBeNull();
    const clone = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { status systemDisk { id status } } } }`, { id: made.server.id })).node;
    expect(clone.status).toBe("ACTIVE");
    expect(clone.systemDisk.status).toBe("IN_USE");
    const cloned = await readDisk(svc, clone.systemDisk.id);
    expect(cloned.subarray(0, 8 * MiB).equals(raw)).toBe(true);
    expect(cloned.subarray(8 * MiB).equals(Buffer.alloc(8 * MiB))).toBe(true);

    const tooSmall = await svc.gql(`mutation ($i: ID!) { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, imageId: $i, systemDiskSizeBytes: ${4 * MiB} }) { server { id } } }`, { i: id });
    expect(code(tooSmall)).toBe("BAD_USER_INPUT");

    // Deleting the server keeps the image; deleting the image keeps the server.
    await svc.ok(`mutation ($id: ID!) { deleteServer(input: { id: $id }) { deletedServerId } }`, { id: s.id });
    expect((await image(id)).status).toBe("ACTIVE");
    await svc.ok(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id });
    const still = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { status sourceImage { id } } } }`, { id: made.server.id })).node;
    expect(still).toEqual({ status: "ACTIVE", sourceImage: null });
  });

  it("makes DATA_DISK images of disks and disks from them", async () => {
    const s = await server("data-host", [8 * MiB]);
    const dataDisk = s.disks.nodes[1].id;
    await writeDisk(svc, dataDisk, bytes(3 * MiB, 2), 1234);
    const id = await createImage({ name: "data-img", diskId: dataDisk });
    expect((await image(id)).type).toBe("DATA_DISK");
    const r = (await svc.ok(`mutation ($i: ID!) { createDisk(input: { name: "from-image", imageId: $i }) { disk { id status sizeBytes } job { id } } }`, { i: id })).createDisk;
    expect(r.disk).toMatchObject({ status: "AVAILABLE", sizeBytes: 8 * MiB });
    expect(r.job).toBeNull();
    expect((await readDisk(svc, r.disk.id)).equals(await readDisk(svc, dataDisk))).toBe(true);
    const wrongKind = await svc.gql(`mutation ($i: ID!) { createServer(input: { name: "x", vcpus: 1, memoryMiB: 512, imageId: $i }) { server { id } } }`, { i: id });
    expect(code(wrongKind)).toBe("BAD_USER_INPUT");
  });

  it("makes one FULL_SERVER image per server backup, shares the backup's chunks, and guards the backup", async () => {
    const s = await server("full", [4 * MiB, 2 * MiB], "LINUX");
    const disks: string[] = s.disks.nodes.map((d: any) => d.id);
    for (const [i, d] of disks.entries()) await writeDisk(svc, d, bytes(2 * MiB, 10 + i));
    const originals = await Promise.all(disks.map((d) => readDisk(svc, d)));
    const backupId = await backupNow(svc, s.id);
    const [{ bytes: before }] = await svc.ds.query(`SELECT coalesce(sum(size_bytes), 0)::bigint AS bytes FROM vault_packs`);
    const id = await createImage({ name: "full-img", backupId });
    const [{ bytes: after }] = await svc.ds.query(`SELECT coalesce(sum(size_bytes), 0)::bigint AS bytes FROM vault_packs`);
    expect(Number(after)).toBe(Number(before)); // no new chunk: all shared with the backup
    const img = await image(id);
    expect(img).toMatchObject({ type: "FULL_SERVER", status: "ACTIVE", source: "BACKUP", exportable: false, sourceBackup: { id: backupId } });

    const again = await svc.gql(`mutation ($b: ID!) { createImage(input: { name: "again", backupId: $b }) { image { id } } }`, { b: backupId });
    expect(code(again)).toBe("CONFLICT");
    const del = await svc.gql(`mutation ($b: ID!) { deleteBackup(input: { id: $b }) { job { id } } }`, { b: backupId });
    expect(code(del)).toBe("FAILED_PRECONDITION");
    const exp = await svc.gql(`mutation ($i: ID!) { exportImage(input: { imageId: $i, format: QCOW2 }) { job { id } } }`, { i: id });
    expect(code(exp)).toBe("FAILED_PRECONDITION");

    // Hydrated: every disk's blocks copied into its own storage by one job.
    const made = (await svc.ok(`mutation ($i: ID!) { createServer(input: { name: "restored", vcpus: 2, memoryMiB: 1024, imageId: $i, hydrate: true }) { server { id } job { id } } }`, { i: id }))
      .createServer;
    await succeed(svc, made.job.id);
    const inVault = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { disks { nodes { hydration { bytesInVault } } } } } }`, { id: made.server.id });
    expect(inVault.node.disks.nodes.map((d: any) => d.hydration.bytesInVault)).toEqual([0, 0, 0]);
    const rebuilt = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Server { status disks { nodes { id device sizeBytes } } } } }`, { id: made.server.id })).node;
    expect(rebuilt.status).toBe("ACTIVE");
    expect(rebuilt.disks.nodes.map((d: any) => [d.device, d.sizeBytes])).toEqual([
      ["/dev/vda", 8 * MiB],
      ["/dev/vdb", 4 * MiB],
      ["/dev/vdc", 2 * MiB],
    ]);
    for (const [i, d] of rebuilt.disks.nodes.entries()) expect((await readDisk(svc, d.id)).equals(originals[i])).toBe(true);

    // Once the image is gone, the backup can go.
    await svc.ok(`mutation ($id: ID!) { deleteImage(input: { id: $id }) { deletedImageId } }`, { id });
    const job = (await svc.ok(`mutation ($b: ID!) { deleteBackup(input: { id: $b }) { job { id } } }`, { b: backupId })).deleteBackup.job.id;
    await succeed(svc, job);
  });

  it("with serverId and type FULL_SERVER, backs the server up first", async () => {
    const s = await server("auto", [2 * MiB]);
    await writeDisk(svc, s.disks.nodes[1].id, bytes(MiB, 20));
    const id = await createImage({ name: "auto-full", serverId: s.id, type: "FULL_SERVER" });
    const img = await image(id);
    expect(img).toMatchObject({ type: "FULL_SERVER", status: "ACTIVE", source: "SERVER" });
    expect(img.sourceBackup).not.toBeNull();
    const backup = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { status resourceType children { totalCount } } } }`, { id: img.sourceBackup.id })).node;
    expect(backup).toEqual({ status: "AVAILABLE", resourceType: "SERVER", children: { totalCount: 2 } });
  });

  it("an image made from a backup survives the backup's deletion and garbage collection", async () => {
    const s = await server("survivor", [4 * MiB]);
    const d = s.disks.nodes[1].id;
    await writeDisk(svc, d, bytes(4 * MiB, 30));
    const backupId = await backupNow(svc, d);
    const id = await createImage({ name: "from-backup", backupId });
    expect((await image(id)).type).toBe("DATA_DISK");
    const job = (await svc.ok(`mutation ($b: ID!) { deleteBackup(input: { id: $b }) { job { id } } }`, { b: backupId })).deleteBackup.job.id;
    await succeed(svc, job);
    await svc.storage.vault.collectGarbage(svc.projectIds.alpha, 0);
    const r = (await svc.ok(`mutation ($i: ID!) { createDisk(input: { name: "after-gc", imageId: $i }) { disk { id } } }`, { i: id })).createDisk;
    expect((await readDisk(svc, r.disk.id)).equals(bytes(4 * MiB, 30))).toBe(true);
  });
});

describe("import and export", () => {
  it("uploads a raw file, imports it, and exports it back byte for byte", async () => {
    const disk = Buffer.concat([bytes(MiB, 40), Buffer.alloc(MiB), Buffer.from("text ".repeat(300_000)).subarray(0, MiB)]);
    const up = await upload(disk);
    expect(up).toMatchObject({ sizeBytes: 3 * MiB, sha256: sha(disk) });
    const r = await importImage({ name: "imported", uploadId: up.id, osType: "LINUX", type: "DATA_DISK" });
    expect(r.errors).toBeUndefined();
    await succeed(svc, r.data.importImage.job.id);
    const img = await image(r.data.importImage.image.id);
    expect(img).toMatchObject({ status: "ACTIVE", source: "IMPORT", type: "DATA_DISK", virtualSizeBytes: 3 * MiB, minDiskBytes: 3 * MiB, checksum: contentChecksum(disk) });
    const { file, exp } = await exportImage(img.id, "RAW");
    expect(file.equals(disk)).toBe(true);
    // A RAW file is sparse; it is checked by the image's checksum, not its own.
    expect(exp).toMatchObject({ status: "READY", format: "RAW", sizeBytes: 3 * MiB, sha256: null, image: { id: img.id } });
    const part = await svc.http(exp.downloadUrl, { headers: { range: "bytes=100-199" } });
    expect(part.status).toBe(206);
    expect(Buffer.from(await part.arrayBuffer()).equals(disk.subarray(100, 200))).toBe(true);
    expect((await svc.http(exp.downloadUrl, { key: svc.keys.beta })).status).toBe(404);
  });

  it("round-trips an image larger than its read batches and write windows: a QCOW2 export's sha256 is its file's", async () => {
    // About 41 MiB: random, zeros and text, so reads span several batches (the last one
    // short), packs and staging windows.
    const text = Buffer.from("the quick brown fox jumps over the lazy dog ".repeat(450_000)).subarray(0, 12 * MiB + 17 * 64 * 1024);
    const disk = Buffer.concat([bytes(20 * MiB, 42), Buffer.alloc(8 * MiB), text]);
    const up = await upload(disk);
    const r = await importImage({ name: "big", uploadId: up.id, type: "DATA_DISK" });
    expect(r.errors).toBeUndefined();
    await succeed(svc, r.data.importImage.job.id);
    const img = await image(r.data.importImage.image.id);
    expect(img).toMatchObject({ status: "ACTIVE", checksum: contentChecksum(disk), virtualSizeBytes: disk.length });
    for (const format of ["RAW", "QCOW2"]) {
      const { file, exp } = await exportImage(img.id, format);
      expect(exp.sha256).toBe(format === "RAW" ? null : sha(file));
      expect(exp.sizeBytes).toBe(file.length);
      if (format === "RAW") expect(file.equals(disk)).toBe(true);
    }
  });

  it("keeps each block read from an image valid while the reader takes a further batch of blocks, also at the end", async () => {
    // 128 blocks per batch: 300 data blocks make batches of 128, 128 and 44.
    const disk = bytes(300 * 64 * 1024, 43);
    const up = await upload(disk);
    const r = await importImage({ name: "lifetimes", uploadId: up.id, type: "DATA_DISK" });
    await succeed(svc, r.data.importImage.job.id);
    const [row] = await svc.ds.query(`SELECT d.id FROM image_disks d WHERE d.image_id = $1`, [fromGlobalId(r.data.importImage.image.id)!.id]);
    const kept: { index: number; data: Buffer }[] = [];
    for await (const b of imageDiskBlocks(svc.ds, svc.storage.vault, svc.projectIds.alpha, row.id)) {
      kept.push(b);
      if (kept.length > 128) kept.shift();
    }
    // Whatever buffers the reader gave back are handed out and overwritten now.
    const pool = svc.storage.vault.codec.buffers;
    const taken = Array.from({ length: 32 }, () => pool.take(64 * 64 * 1024).fill(0xff));
    for (const t of taken) pool.give(t);
    expect(kept).toHaveLength(128);
    for (const b of kept) expect(b.data.equals(disk.subarray(b.index * 64 * 1024, (b.index + 1) * 64 * 1024))).toBe(true);
  });

  it("refuses a declared format that disagrees, unknown upload IDs, and uploads past the limit", async () => {
    const up = await upload(bytes(MiB, 41));
    const wrong = await importImage({ name: "x", uploadId: up.id, format: "QCOW2" });
    expect(code(wrong)).toBe("BAD_USER_INPUT");
    expect(wrong.errors![0].extensions!.field).toBe("format");
    expect(code(await importImage({ name: "x", uploadId: crypto.randomUUID() }))).toBe("NOT_FOUND");
    expect(code(await importImage({ name: "x", uploadId: up.id }))).toBeUndefined();
    const vhdx = Buffer.concat([Buffer.from("vhdxfile"), Buffer.alloc(MiB)]);
    const refused = await importImage({ name: "x", uploadId: (await upload(vhdx)).id });
    expect(code(refused)).toBe("BAD_USER_INPUT");
    expect(refused.errors![0].message).toMatch(/VHDX/);
  });

  it("ends the import of a damaged file KILLED with the reason, and keeps serving", async () => {
    // A qcow2 header whose L1 table lies far past the end of the file.
    const header = Buffer.alloc(4096);
    header.write("QFI\xfb", 0, "latin1");
    header.writeUInt32BE(3, 4);
    header.writeUInt32BE(16, 20); // 64 KiB clusters
    header.writeBigUInt64BE(BigInt(16 * MiB), 24);
    header.writeUInt32BE(1, 36); // l1_size
    header.writeBigUInt64BE(BigInt(1) << BigInt(40), 40); // l1_table_offset
    header.writeBigUInt64BE(BigInt(65536), 48);
    header.writeUInt32BE(1, 56);
    header.writeUInt32BE(4, 96);
    header.writeUInt32BE(104, 100);
    const r = await importImage({ name: "broken", uploadId: (await upload(header)).id });
    expect(r.errors).toBeUndefined();
    const job = await waitJob(svc, r.data.importImage.job.id);
    expect(job.status).toBe("FAILED");
    const img = await image(r.data.importImage.image.id);
    expect(img.status).toBe("KILLED");
    expect(img.error).toEqual({ code: "BAD_IMAGE", message: expect.stringMatching(/QCOW2/) });
    expect((await svc.ok(`{ viewer { name } }`)).viewer.name).toBe("alpha");
  });

  it("interoperates with qemu-img: imports what it writes in every format, and writes what it reads", async () => {
    const q = qemuImg();
    if (!q) return expect(process.env.STOWAGE_SKIP_EXTERNAL).toBe("1");
    const t = tmpDir();
    try {
      const disk = Buffer.concat([bytes(2 * MiB, 50), Buffer.alloc(3 * MiB), Buffer.from("abc ".repeat(300_000)).subarray(0, MiB), bytes(2 * MiB, 51)]);
      const rawFile = path.join(t.dir, "disk.raw");
      fs.writeFileSync(rawFile, disk);
      const variants: [string, string[]][] = [
        ["QCOW2", ["-O", "qcow2", "-c"]],
        ["VMDK", ["-O", "vmdk", "-o", "subformat=streamOptimized"]],
        ["VHD", ["-O", "vpc", "-o", "subformat=dynamic,force_size=on"]],
      ];
      for (const [format, args] of variants) {
        const file = path.join(t.dir, `in.${format}`);
        execFileSync(q, ["convert", "-f", "raw", ...args, rawFile, file]);
        const r = await importImage({ name: `q-${format}`, uploadId: (await upload(fs.readFileSync(file))).id, format, type: "DATA_DISK" });
        expect(r.errors).toBeUndefined();
        await succeed(svc, r.data.importImage.job.id);
        const img = await image(r.data.importImage.image.id);
        expect({ format, checksum: img.checksum }).toEqual({ format, checksum: contentChecksum(disk) });

        const { file: out, exp } = await exportImage(img.id, format);
        expect(exp.sha256).toBe(crypto.createHash("sha256").update(out).digest("hex"));
        const outFile = path.join(t.dir, `out.${format}`);
        fs.writeFileSync(outFile, out);
        const driver = format === "VHD" ? "vpc" : format.toLowerCase();
        if (format !== "VHD") execFileSync(q, ["check", "-f", driver, outFile]);
        execFileSync(q, ["compare", "-f", "raw", "-F", driver, rawFile, outFile]);
      }
    } finally {
      t.cleanup();
    }
  });
});
