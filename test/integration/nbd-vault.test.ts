import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { freePort } from "../../bench/lib/proc";
import { backupNow, BLOCK, bytes, createDisk, succeed, writeDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

const qemuImg = requireProgram(["/usr/bin/qemu-img"], "qemu-utils");
const qemuIo = requireProgram(["/usr/bin/qemu-io"], "qemu-utils");
const nbdinfo = requireProgram(["/usr/bin/nbdinfo"], "libnbd-bin");
const maybe = qemuImg && qemuIo && nbdinfo ? describe : describe.skip;

/** Runs a client without blocking the event loop: the NBD server answering it lives in this process. */
async function run(cmd: string, args: string[]): Promise<string> {
  return (await promisify(execFile)(cmd, args, { encoding: "utf8", timeout: 120_000, maxBuffer: 64 * MiB })).stdout;
}
async function refused(cmd: string, args: string[]): Promise<string> {
  try {
    await run(cmd, args);
  } catch (err) {
    return `${(err as { stdout?: string }).stdout}\n${(err as { stderr?: string }).stderr}`;
  }
  throw new Error(`${cmd} ${args.join(" ")} succeeded`);
}

const EXPORT = `mutation ($id: ID!, $ro: Boolean) { createNbdExport(input: { resourceId: $id, readOnly: $ro }) { nbdExport { id uri readOnly resource { id __typename } } } }`;
const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];

maybe("backups and images over NBD, read from the vault", () => {
  let svc: TestService;
  let tmp: string;
  beforeAll(async () => {
    svc = await startTestService({ NBD_PORT: String(await freePort()) });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-nbd-vault-"));
  });
  afterAll(async () => {
    await svc?.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  /** A sparse raw file of `size` bytes holding `parts` at their offsets, as the disk should read. */
  function rawFile(name: string, size: number, parts: [number, Buffer][]): string {
    const file = path.join(tmp, name);
    const fd = fs.openSync(file, "w");
    fs.ftruncateSync(fd, size);
    for (const [at, data] of parts) fs.writeSync(fd, data, 0, data.length, at);
    fs.closeSync(fd);
    return file;
  }

  it("serves each backup of a chain as it was taken, across 2^31 and 2^32, with its holes, no copy made", async () => {
    const size = 5 * GiB;
    const disk = await createDisk(svc, "chain", size);
    const a = bytes(3 * BLOCK, 1);
    const b = bytes(2 * BLOCK + 512, 2);
    await writeDisk(svc, disk, a, 2 ** 31 - BLOCK);
    await writeDisk(svc, disk, b, 2 ** 32 - BLOCK);
    const first = await backupNow(svc, disk);
    const c = bytes(BLOCK, 3);
    await writeDisk(svc, disk, c, 2 ** 31); // overwrites the middle block of `a`
    await writeDisk(svc, disk, Buffer.alloc(BLOCK), 2 ** 32 - BLOCK); // zeroes the first block of `b`
    const second = await backupNow(svc, disk);
    const disksBefore = Number((await svc.ds.query(`SELECT count(*) AS n FROM disks`))[0].n);
    const segmentsBefore = Number((await svc.ds.query(`SELECT count(*) AS n FROM volume_segments`))[0].n);

    const one = (await svc.ok(EXPORT, { id: first })).createNbdExport.nbdExport;
    expect(one).toMatchObject({ readOnly: true, resource: { id: first, __typename: "Backup" } });
    const two = (await svc.ok(EXPORT, { id: second, ro: true })).createNbdExport.nbdExport;

    const info = JSON.parse(await run(qemuImg!, ["info", "--output=json", one.uri]));
    expect(info["virtual-size"]).toBe(size);
    const expectFirst = rawFile("first.raw", size, [
      [2 ** 31 - BLOCK, a],
      [2 ** 32 - BLOCK, b],
    ]);
    const secondB = Buffer.concat([Buffer.alloc(BLOCK), b.subarray(BLOCK)]);
    const expectSecond = rawFile("second.raw", size, [
      [2 ** 31 - BLOCK, a],
      [2 ** 31, c],
      [2 ** 32 - BLOCK, secondB],
    ]);
    // qemu-img compare reads both whole: identical means every byte, holes included.
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", expectFirst, one.uri]);
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", expectSecond, two.uri]);
    expect(await refused(qemuImg!, ["compare", "-f", "raw", "-F", "raw", expectFirst, two.uri])).toMatch(/Content mismatch at offset 2147483648!/);

    // qemu-img convert out of it reproduces the backup's bytes.
    const copy = path.join(tmp, "copy.raw");
    await run(qemuImg!, ["convert", "-O", "raw", "-f", "raw", two.uri, copy]);
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", expectSecond, copy]);
    fs.rmSync(copy);

    // The holes are holes: block status shows only the blocks the chain recorded with data.
    const extents = (await run(nbdinfo!, ["--map", two.uri]))
      .trim()
      .split("\n")
      .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number))
      .filter(([, , type]) => type === 0)
      .map(([start, length]) => [start, length]);
    expect(extents).toEqual([
      [2 ** 31 - BLOCK, 3 * BLOCK],
      [2 ** 32, 2 * BLOCK],
    ]);

    // Nothing was copied: no disk, no volume segment.
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM disks`))[0].n)).toBe(disksBefore);
    expect(Number((await svc.ds.query(`SELECT count(*) AS n FROM volume_segments`))[0].n)).toBe(segmentsBefore);

    // Read-only: a write is refused with EPERM and the backup is unchanged.
    expect(await refused(qemuIo!, ["-f", "raw", "-c", "write -P 0x55 0 4096", two.uri])).toMatch(/Operation not permitted|read-only|Permission denied/i);
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", expectSecond, two.uri]);
  });

  it("serves an image, and refuses what cannot be served read-only", async () => {
    const disk = await createDisk(svc, "imaged", 64 * MiB);
    const data = bytes(5 * BLOCK + 100, 9);
    await writeDisk(svc, disk, data, 7 * MiB);
    const made = (await svc.ok(`mutation ($d: ID!) { createImage(input: { name: "img", diskId: $d, type: DATA_DISK }) { image { id } job { id } } }`, { d: disk })).createImage;
    await succeed(svc, made.job.id);
    const exp = (await svc.ok(EXPORT, { id: made.image.id })).createNbdExport.nbdExport;
    expect(exp).toMatchObject({ readOnly: true, resource: { id: made.image.id, __typename: "Image" } });
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", rawFile("image.raw", 64 * MiB, [[7 * MiB, data]]), exp.uri]);

    // A backup or an image cannot be served read-write, another project cannot serve it, and a server backup is served by its disks.
    expect((await svc.gql(EXPORT, { id: made.image.id, ro: false })).errors?.[0].extensions?.code).toBe("BAD_USER_INPUT");
    expect((await svc.gql(EXPORT, { id: made.image.id }, svc.keys.beta)).errors?.[0].extensions?.code).toBe("NOT_FOUND");
    const server = (
      await svc.ok(`mutation { createServer(input: { name: "srv", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${8 * MiB}, dataDisks: [{ sizeBytes: ${4 * MiB} }] }) { server { id } } }`)
    ).createServer.server.id;
    const whole = await backupNow(svc, server);
    const refusal = await svc.gql(EXPORT, { id: whole });
    expect(refusal.errors?.[0].extensions?.code).toBe("BAD_USER_INPUT");
    expect(refusal.errors?.[0].message).toMatch(/children/);
    const part = (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Backup { children(first: 5) { nodes { id } } } } }`, { id: whole })).node.children.nodes[1].id;
    const partExport = (await svc.ok(EXPORT, { id: part })).createNbdExport.nbdExport;
    expect(JSON.parse(await run(qemuImg!, ["info", "--output=json", partExport.uri]))["virtual-size"]).toBe(4 * MiB);
  });

  it("answers EIO for a corrupt chunk and goes on serving; deleting the backup revokes its export", async () => {
    const disk = await createDisk(svc, "damaged", 8 * MiB);
    const data = bytes(8 * MiB, 21);
    await writeDisk(svc, disk, data);
    const b = await backupNow(svc, disk);
    const { uri } = (await svc.ok(EXPORT, { id: b })).createNbdExport.nbdExport;

    // Flip bytes inside the stored chunk of block 5.
    const [loc] = await svc.ds.query(`SELECT c.pack_id, c.pack_offset FROM backup_blocks bb JOIN vault_chunks c ON c.hash = bb.hash WHERE bb.backup_id = $1 AND bb.block_index = 5`, [uuid(b)]);
    const file = path.join(svc.dataDir, "blobs", "vault", svc.projectIds.alpha, "packs", loc.pack_id.slice(0, 2), loc.pack_id);
    const fd = fs.openSync(file, "r+");
    fs.writeSync(fd, Buffer.from("CORRUPT!"), 0, 8, Number(loc.pack_offset) + 100);
    fs.closeSync(fd);

    expect(await refused(qemuIo!, ["-f", "raw", "-r", "-c", `read ${5 * BLOCK} 4096`, uri])).toMatch(/Input\/output error/);
    // The rest of the backup still reads, and so does the service.
    const other = await run(qemuIo!, ["-f", "raw", "-r", "-c", `read -v ${6 * BLOCK} 16`, uri]);
    expect(other).toContain(
      data
        .subarray(6 * BLOCK, 6 * BLOCK + 16)
        .toString("hex")
        .match(/../g)!
        .join(" "),
    );
    expect((await svc.http("/healthz")).status).toBe(200);

    const job = (await svc.ok(`mutation ($id: ID!) { deleteBackup(input: { id: $id }) { job { id } } }`, { id: b })).deleteBackup.job.id;
    await succeed(svc, job);
    expect(await refused(qemuImg!, ["info", uri])).toMatch(/export/i);
  });
});
