import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";
import { freePort } from "../../bench/lib/proc";
import { loadConfig } from "../../src/config";
import { compactStorage } from "../../src/jobs";
import { decodeRecords } from "../../src/nbd/journal";
import { silentLogger } from "../../src/logger";
import { backupNow, BLOCK, bytes, createDisk, readDisk, restoreNow, sha, succeed, writeDisk } from "../helpers/data";
import { requireProgram } from "../helpers/external";
import { RawNbd } from "../helpers/nbd-client";
import { GiB, MiB, startTestService, type TestService } from "../helpers/service";

const qemuImg = requireProgram(["/usr/bin/qemu-img"], "qemu-utils");
const qemuIo = requireProgram(["/usr/bin/qemu-io"], "qemu-utils");
const nbdinfo = requireProgram(["/usr/bin/nbdinfo"], "libnbd-bin");
const nbdcopy = requireProgram(["/usr/bin/nbdcopy"], "libnbd-bin");
const programs = qemuImg && qemuIo && nbdinfo && nbdcopy;
const maybe = programs ? describe : describe.skip;

/** Runs a client without blocking the event loop: the NBD server answering it lives in this process. */
async function run(cmd: string, args: string[]): Promise<string> {
  return (await promisify(execFile)(cmd, args, { encoding: "utf8", timeout: 120_000, maxBuffer: 64 * MiB })).stdout;
}
/** The same, for a client expected to fail: its stderr. */
async function refused(cmd: string, args: string[]): Promise<string> {
  try {
    await run(cmd, args);
  } catch (err) {
    return String((err as { stderr?: string }).stderr);
  }
  throw new Error(`${cmd} ${args.join(" ")} succeeded`);
}

const EXPORT = `mutation ($id: ID!, $ro: Boolean) { createNbdExport(input: { resourceId: $id, readOnly: $ro }) { nbdExport { id uri readOnly createdAt resource { id } } } }`;
const uuid = (gid: string) => Buffer.from(gid, "base64url").toString().split(":")[1];
const nameOf = (uri: string) => new URL(uri).pathname.slice(1);

/** Waits until `check` passes (it throws until then), for as long as a few of the service's commit delays. */
async function eventually(check: () => Promise<void>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await check();
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

maybe("disks over NBD", () => {
  let svc: TestService;
  let tmp: string;
  beforeAll(async () => {
    // Unflushed writes are committed 3 s after the first of a batch: long enough to see them journaled first.
    svc = await startTestService({ NBD_PORT: String(await freePort()), NBD_COMMIT_DELAY_MS: "3000" });
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-nbd-"));
  });
  afterAll(async () => {
    await svc?.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function exportOf(diskId: string, readOnly = false): Promise<{ id: string; uri: string }> {
    return (await svc.ok(EXPORT, { id: diskId, ro: readOnly })).createNbdExport.nbdExport;
  }

  it("creates, lists and revokes exports through the graph, scoped to the project", async () => {
    const disk = await createDisk(svc, "graph", 8 * MiB);
    const made = (await svc.ok(EXPORT, { id: disk, ro: true })).createNbdExport.nbdExport;
    expect(made).toMatchObject({ readOnly: true, resource: { id: disk } });
    expect(made.uri).toMatch(new RegExp(`^nbd://127\\.0\\.0\\.1:${svc.nbdPort}/[A-Za-z0-9_-]{43}$`));
    const listed = await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Disk { nbdExports(first: 10) { totalCount nodes { id uri readOnly } } } } }`, { id: disk });
    expect(listed.node.nbdExports).toEqual({ totalCount: 1, nodes: [{ id: made.id, uri: made.uri, readOnly: true }] });
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on NbdExport { uri } } }`, { id: made.id })).node.uri).toBe(made.uri);

    // Another project neither sees the disk nor the export.
    const foreign = await svc.gql(EXPORT, { id: disk, ro: false }, svc.keys.beta);
    expect(foreign.errors?.[0].extensions?.code).toBe("NOT_FOUND");
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { id } }`, { id: made.id }, svc.keys.beta)).node).toBeNull();
    const foreignDelete = await svc.gql(`mutation ($id: ID!) { deleteNbdExport(input: { id: $id }) { deletedNbdExportId } }`, { id: made.id }, svc.keys.beta);
    expect(foreignDelete.errors?.[0].extensions?.code).toBe("NOT_FOUND");

    const bad = await svc.gql(EXPORT, { id: "nope", ro: false });
    expect(bad.errors?.[0].extensions?.code).toBe("BAD_USER_INPUT");

    const deleted = await svc.ok(`mutation ($id: ID!) { deleteNbdExport(input: { id: $id }) { deletedNbdExportId } }`, { id: made.id });
    expect(deleted.deleteNbdExport.deletedNbdExportId).toBe(made.id);
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Disk { nbdExports { totalCount } } } }`, { id: disk })).node.nbdExports.totalCount).toBe(0);
  });

  it("is opened as it is by qemu-img and nbdinfo, which see a sparse 1 TiB disk's holes", async () => {
    const disk = await createDisk(svc, "tera", 1024 * GiB);
    await writeDisk(svc, disk, bytes(BLOCK, 1), 2 ** 31);
    await writeDisk(svc, disk, bytes(2 * BLOCK, 2), 2 ** 32 - BLOCK);
    const { uri } = await exportOf(disk, true);
    const info = JSON.parse(await run(qemuImg!, ["info", "--output=json", uri]));
    expect(info["virtual-size"]).toBe(1024 * GiB);
    // nbdinfo --map: start, length, type (0 data, 3 hole+zero), description.
    const extents = (await run(nbdinfo!, ["--map", uri]))
      .trim()
      .split("\n")
      .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
    expect(extents.filter(([, , type]) => type === 0)).toEqual([
      [2 ** 31, BLOCK, 0],
      [2 ** 32 - BLOCK, 2 * BLOCK, 0],
    ]);
    const qmap = JSON.parse(await run(qemuImg!, ["map", "--output=json", "-f", "raw", uri])) as { start: number; length: number; data: boolean }[];
    expect(qmap.filter((e) => e.data).map((e) => [e.start, e.length])).toEqual([
      [2 ** 31, BLOCK],
      [2 ** 32 - BLOCK, 2 * BLOCK],
    ]);
    // Reading across 2^32 gives the bytes written there.
    const out = path.join(tmp, "edge.raw");
    await run(qemuIo!, ["-f", "raw", "-r", "-c", `read -v ${2 ** 32 - 16} 32`, uri]).then((text) => expect(text).toContain("read 32/32 bytes"));
    fs.rmSync(out, { force: true });
  });

  it("discards a whole 1 TiB disk by what it holds: the blocks that held data become zeros in one or two commits, and nothing else is touched", async () => {
    const disk = await createDisk(svc, "discard", 1024 * GiB);
    await writeDisk(svc, disk, bytes(BLOCK, 1), 2 ** 31);
    await writeDisk(svc, disk, bytes(2 * BLOCK, 2), 2 ** 40 - 2 * BLOCK);
    const [before] = await svc.ds.query(`SELECT write_version FROM disks WHERE id = $1`, [uuid(disk)]);
    const { uri } = await exportOf(disk);
    // qemu-io takes at most 2 GiB a command: a GiB at a time (qemu cuts each into the requests the server takes).
    const discards = Array.from({ length: 1024 }, (_, k) => ["-c", `discard ${k * GiB} ${GiB}`]).flat();
    const text = await run(qemuIo!, ["-f", "raw", ...discards, "-c", "flush", uri]);
    expect(text).not.toMatch(/error/i);
    await eventually(async () => {
      const [{ used }] = await svc.ds.query(`SELECT used_bytes::bigint AS used FROM disks WHERE id = $1`, [uuid(disk)]);
      expect(Number(used)).toBe(0);
    });
    // The three blocks that held data keep tombstones for the next incremental backup; no other row was made.
    const rows = await svc.ds.query(`SELECT block_index::bigint AS i, hash FROM disk_blocks WHERE disk_id = $1 ORDER BY block_index`, [uuid(disk)]);
    expect(rows.map((r: { i: string; hash: Buffer | null }) => [Number(r.i), r.hash])).toEqual([
      [2 ** 31 / BLOCK, null],
      [2 ** 40 / BLOCK - 2, null],
      [2 ** 40 / BLOCK - 1, null],
    ]);
    const [after] = await svc.ds.query(`SELECT write_version FROM disks WHERE id = $1`, [uuid(disk)]);
    expect(Number(after.write_version) - Number(before.write_version)).toBeLessThanOrEqual(2);
    expect((await run(nbdinfo!, ["--map", uri])).trim().split("\n")).toHaveLength(1);
  });

  it("takes a qemu-img convert of mixed data that qemu-img compare finds equal, and the data endpoint reads the same bytes", async () => {
    const size = 24 * MiB;
    const src = path.join(tmp, "src.raw");
    const image = Buffer.alloc(size);
    bytes(5 * MiB, 7).copy(image, 0);
    image.fill(0x5a, 9 * MiB, 12 * MiB);
    bytes(3 * MiB + 4321, 8).copy(image, 16 * MiB + 1000);
    fs.writeFileSync(src, image);
    const disk = await createDisk(svc, "convert", size);
    const { uri } = await exportOf(disk);
    await run(qemuImg!, ["convert", "-n", "-f", "raw", "-O", "raw", src, uri]);
    await run(qemuImg!, ["compare", "-f", "raw", "-F", "raw", src, uri]);
    expect(sha(await readDisk(svc, disk))).toBe(sha(image));
    // Each stored block is named by the SHA-256 of its bytes (backups deduplicate by it), and blocks of zeros are holes.
    const named: [number, string][] = [];
    for (let i = 0; i < size / BLOCK; i++) {
      const block = image.subarray(i * BLOCK, (i + 1) * BLOCK);
      if (block.some((b) => b !== 0)) named.push([i, sha(block)]);
    }
    await eventually(async () => {
      const rows = await svc.ds.query(`SELECT block_index::bigint AS i, hash FROM disk_blocks WHERE disk_id = $1 AND hash IS NOT NULL ORDER BY block_index`, [uuid(disk)]);
      expect(rows.map((r: { i: string; hash: Buffer }) => [Number(r.i), r.hash.toString("hex")])).toEqual(named);
    });
    // nbdcopy in over its 4 connections at once (multi-conn), into a service whose write buffer (1 MiB a disk)
    // fills and commits in the middle of requests all the time: every byte lands.
    const small = await startTestService({ NBD_PORT: String(await freePort()), NBD_WRITE_BUFFER_BYTES: String(4 * MiB) });
    try {
      const big = path.join(tmp, "big.raw");
      const many = Buffer.concat([bytes(40 * MiB, 11), Buffer.alloc(8 * MiB), bytes(16 * MiB, 12)]);
      fs.writeFileSync(big, many);
      const bigDisk = await createDisk(small, "multi-writer", many.length);
      const bigUri = (await small.ok(EXPORT, { id: bigDisk, ro: false })).createNbdExport.nbdExport.uri;
      await run(nbdcopy!, ["--flush", "--request-size=1048576", big, bigUri]);
      expect(sha(await readDisk(small, bigDisk))).toBe(sha(many));
      fs.rmSync(big);
    } finally {
      await small.stop();
    }
    // nbdcopy out of it gives the same file.
    const back = path.join(tmp, "back.raw");
    await run(nbdcopy!, [uri, back]);
    expect(sha(fs.readFileSync(back))).toBe(sha(image));
    fs.rmSync(back);
    fs.rmSync(src);
  });

  it("sees qemu-io's writes at once, keeps them through a flush, and zeroes what it trims or write-zeroes", async () => {
    const disk = await createDisk(svc, "io", 8 * MiB);
    await writeDisk(svc, disk, Buffer.alloc(8 * MiB, 0x11));
    const { uri } = await exportOf(disk);
    const text = await run(qemuIo!, [
      "-f",
      "raw",
      "-c",
      "write -P 0xab 100k 300k",
      "-c",
      "read -P 0xab 100k 300k",
      "-c",
      "write -f -P 0xcd 1m 64k",
      "-c",
      "flush",
      "-c",
      "write -z 2m 1m",
      "-c",
      "discard 4m 128k",
      "-c",
      "write -z 6m 1000",
      "-c",
      "flush",
      "-c",
      "read -P 0x11 99k 1k",
      "-c",
      "read -P 0 2m 1m",
      uri,
    ]);
    expect(text).not.toMatch(/error|Pattern verification failed/i);
    const expected = Buffer.alloc(8 * MiB, 0x11);
    expected.fill(0xab, 100 * 1024, 400 * 1024);
    expected.fill(0xcd, MiB, MiB + BLOCK);
    expected.fill(0, 2 * MiB, 3 * MiB);
    expected.fill(0, 4 * MiB, 4 * MiB + 128 * 1024);
    expected.fill(0, 6 * MiB, 6 * MiB + 1000);
    // Committed within the commit delay (or when qemu-io left): the HTTP route reads them from the volume store.
    await eventually(async () => expect(sha(await readDisk(svc, disk))).toBe(sha(expected)));
    // Whole zeroed blocks no longer hold data.
    const [{ used }] = await svc.ds.query(`SELECT used_bytes::bigint AS used FROM disks WHERE id = $1`, [uuid(disk)]);
    expect(Number(used)).toBe(8 * MiB - MiB - 2 * BLOCK);
  });

  it("answers reads of every size with the disk's bytes, a small read's buffer never becoming memory a later reply uses", async () => {
    const disk = await createDisk(svc, "sizes", 4 * MiB);
    await writeDisk(svc, disk, Buffer.alloc(4 * MiB, 0x5a));
    const { uri } = await exportOf(disk, true);
    // Reads under 4 KiB take their buffers from Node's shared slab, where the replies' headers are cut too; reads
    // of 4 KiB and more take pooled buffers. A slab given to the pool came back for the next read with headers written into it.
    const reads = [];
    for (let i = 0; i < 20; i++) reads.push("-c", `read -P 0x5a ${i * 4096} 512`, "-c", `read -P 0x5a ${MiB + i * 8192} 8k`, "-c", `read -P 0x5a ${2 * MiB + i} 6000`);
    const text = await run(qemuIo!, ["-f", "raw", "-r", ...reads, uri]);
    expect(text).not.toMatch(/error|Pattern verification failed/i);
    expect(text.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(60);
  });

  it("refuses a wrong or revoked name exactly like an unknown one, and lists nothing", async () => {
    const disk = await createDisk(svc, "names", MiB);
    const good = await exportOf(disk);
    const wrong = good.uri.replace(/\/[^/]+$/, `/${"A".repeat(43)}`);
    const wrongText = await refused(nbdinfo!, [wrong]);
    await svc.ok(`mutation ($id: ID!) { deleteNbdExport(input: { id: $id }) { deletedNbdExportId } }`, { id: good.id });
    const revokedText = await refused(nbdinfo!, [good.uri]);
    const strip = (s: string) => s.replaceAll(nameOf(wrong), "NAME").replaceAll(nameOf(good.uri), "NAME");
    expect(strip(revokedText)).toBe(strip(wrongText));
    expect(wrongText).toMatch(/server replied with error to opt_go request: No such file or directory/);

    const other = await exportOf(disk);
    const list = await run(nbdinfo!, ["--list", `nbd://127.0.0.1:${svc.nbdPort}`]);
    expect(list).not.toContain(nameOf(other.uri));
    const raw = await RawNbd.connect(svc.nbdPort);
    raw.option(3);
    expect(await raw.replies()).toEqual([{ type: 1, data: Buffer.alloc(0) }]);
    raw.end();
  });

  it("drops a live connection when its export is revoked, its disk detached or deleted", async () => {
    const disk = await createDisk(svc, "revoke", MiB);
    const a = await exportOf(disk, true);
    const b = await exportOf(disk, true);
    const c1 = await RawNbd.connect(svc.nbdPort);
    expect(await c1.go(nameOf(a.uri))).toEqual({ size: MiB, flags: expect.any(Number) });
    const c2 = await RawNbd.connect(svc.nbdPort);
    expect(await c2.go(nameOf(b.uri))).toMatchObject({ size: MiB });
    await svc.ok(`mutation ($id: ID!) { deleteNbdExport(input: { id: $id }) { deletedNbdExportId } }`, { id: a.id });
    expect(await c1.closedWithin(1000)).toBe(true);
    // The other export of the disk still answers.
    c2.request(0, 0, 4096, 9);
    expect(await c2.reply(4096)).toMatchObject({ error: 0, cookie: 9 });
    // Deleting the disk takes its exports; the edge notices within a second or two.
    await svc.ok(`mutation ($id: ID!) { deleteDisk(input: { id: $id }) { deletedDiskId } }`, { id: disk });
    expect(await c2.closedWithin(3000)).toBe(true);

    const server = (await svc.ok(`mutation { createServer(input: { name: "vm", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB} }) { server { id } } }`)).createServer.server.id;
    const data = await createDisk(svc, "attached", MiB);
    await svc.ok(`mutation ($d: ID!, $s: ID!) { attachDisk(input: { diskId: $d, serverId: $s }) { disk { id } } }`, { d: data, s: server });
    const e = await exportOf(data);
    const c3 = await RawNbd.connect(svc.nbdPort);
    expect(await c3.go(nameOf(e.uri))).toMatchObject({ size: MiB });
    await svc.ok(`mutation ($d: ID!) { detachDisk(input: { diskId: $d }) { disk { id } } }`, { d: data });
    expect(await c3.closedWithin(1000)).toBe(true);

    // A restore onto the disk replaces its bytes: its exports go, their connections within a second or two.
    const backupId = await backupNow(svc, data);
    const f = await exportOf(data);
    const c4 = await RawNbd.connect(svc.nbdPort);
    expect(await c4.go(nameOf(f.uri))).toMatchObject({ size: MiB });
    await restoreNow(svc, { backupId });
    expect(await c4.closedWithin(3000)).toBe(true);
    expect((await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Disk { nbdExports { totalCount } } } }`, { id: data })).node.nbdExports.totalCount).toBe(0);
  });

  it("closes a connection that breaks the protocol and answers bad requests with their errors, leaving the disk and the service whole", async () => {
    const disk = await createDisk(svc, "faults", MiB);
    const content = bytes(MiB, 4);
    await writeDisk(svc, disk, content);
    const rw = await exportOf(disk);
    const ro = await exportOf(disk, true);

    // Past the end, and an oversized read: EINVAL, and the connection goes on.
    const c = await RawNbd.connect(svc.nbdPort);
    expect(await c.go(nameOf(ro.uri))).toMatchObject({ size: MiB });
    c.request(0, MiB - 10, 20, 1);
    expect(await c.reply()).toMatchObject({ error: 22, cookie: 1 });
    c.request(0, 0, 64 * MiB, 2);
    expect(await c.reply()).toMatchObject({ error: 22, cookie: 2 });
    c.request(0, 2n ** 63n, 1, 3);
    expect(await c.reply()).toMatchObject({ error: 22, cookie: 3 });
    // A write on a read-only export: its payload is read and refused with EPERM.
    c.request(1, 0, 4096, 4, 0, Buffer.alloc(4096, 0xff));
    expect(await c.reply()).toMatchObject({ error: 1, cookie: 4 });
    c.request(0, 0, 4096, 5);
    expect(await c.reply(4096)).toEqual({ error: 0, cookie: 5, data: content.subarray(0, 4096) });
    // An unknown command: EINVAL. Then garbage: the connection is closed.
    c.request(99, 0, 0, 6);
    expect(await c.reply()).toMatchObject({ error: 22, cookie: 6 });
    c.socket.write(Buffer.alloc(28, 0x42));
    expect(await c.closedWithin(2000)).toBe(true);

    // A write past the end: ENOSPC; a write longer than the maximum: closed.
    const w = await RawNbd.connect(svc.nbdPort);
    expect(await w.go(nameOf(rw.uri))).toMatchObject({ size: MiB });
    w.request(1, MiB - 100, 200, 7, 0, Buffer.alloc(200, 1));
    expect(await w.reply()).toMatchObject({ error: 28, cookie: 7 });
    w.request(1, 0, 2 ** 31, 8);
    expect(await w.closedWithin(2000)).toBe(true);

    // A disconnect in the middle of a write's payload.
    const d = await RawNbd.connect(svc.nbdPort);
    expect(await d.go(nameOf(rw.uri))).toMatchObject({ size: MiB });
    const head = Buffer.alloc(28);
    head.writeUInt32BE(0x25609513, 0);
    head.writeUInt16BE(1, 6);
    head.writeUInt32BE(256 * 1024, 24);
    d.socket.write(Buffer.concat([head, Buffer.alloc(1000, 0xee)]));
    await new Promise((r) => setTimeout(r, 100));
    d.end();
    // Bad option magic in the handshake.
    const h = await RawNbd.connect(svc.nbdPort);
    h.socket.write(Buffer.alloc(16, 0x41));
    expect(await h.closedWithin(2000)).toBe(true);

    // The disk is as it was, bar what the unacknowledged write may have left in its first 1000 bytes,
    // and the service still serves it.
    const now = await readDisk(svc, disk);
    expect(sha(now.subarray(64 * 1024))).toBe(sha(content.subarray(64 * 1024)));
    const again = await RawNbd.connect(svc.nbdPort);
    expect(await again.go(nameOf(rw.uri))).toMatchObject({ size: MiB });
    again.end();
    expect((await svc.ok(`{ __typename }`)).__typename).toBe("Query");
  });

  it("keeps several connections to a disk consistent, as it advertises: a read on any sees what any was told, a FLUSH on any makes it durable", async () => {
    const disk = await createDisk(svc, "multi", MiB);
    const rw = await exportOf(disk);
    const ro = await exportOf(disk, true);
    const w1 = await RawNbd.connect(svc.nbdPort);
    const first = await w1.go(nameOf(rw.uri));
    expect(first).toMatchObject({ size: MiB });
    expect(("flags" in first && first.flags & 0x100) !== 0).toBe(true); // NBD_FLAG_CAN_MULTI_CONN
    const w2 = await RawNbd.connect(svc.nbdPort);
    expect(await w2.go(nameOf(rw.uri))).toMatchObject({ size: MiB });
    const r = await RawNbd.connect(svc.nbdPort);
    const info = await r.go(nameOf(ro.uri));
    expect(info).toMatchObject({ size: MiB });
    expect(("flags" in info && info.flags & 2) !== 0).toBe(true); // NBD_FLAG_READ_ONLY
    // Acknowledged on one writer, not flushed: the reader and the other writer see it.
    w1.request(1, 5000, 3, 1, 0, Buffer.from("abc"));
    expect(await w1.reply()).toMatchObject({ error: 0 });
    w2.request(1, 6000, 3, 2, 0, Buffer.from("xyz"));
    expect(await w2.reply()).toMatchObject({ error: 0 });
    r.request(0, 4999, 5, 3);
    expect((await r.reply(5)).data).toEqual(Buffer.from([0, 0x61, 0x62, 0x63, 0]));
    w2.request(0, 5000, 3, 4);
    expect((await w2.reply(3)).data.toString()).toBe("abc");
    // A FLUSH on the reader's connection makes both writers' writes durable: journaled, as they came.
    r.request(3, 0, 0, 5);
    expect(await r.reply()).toMatchObject({ error: 0, cookie: 5 });
    const journaled: { records: Buffer }[] = await svc.ds.query(`SELECT records FROM nbd_journal WHERE disk_id = $1 ORDER BY seq`, [uuid(disk)]);
    const records = decodeRecords(Buffer.concat(journaled.map((j) => j.records)));
    expect(records.map((x) => [x.offset, x.data?.toString()])).toEqual([
      [5000, "abc"],
      [6000, "xyz"],
    ]);
    // Committed within the commit delay (the HTTP endpoint reads only what is committed), and the rows go with it.
    await eventually(async () => expect((await readDisk(svc, disk, [5000, 5002])).toString()).toBe("abc"));
    expect((await readDisk(svc, disk, [6000, 6002])).toString()).toBe("xyz");
    await eventually(async () => expect(await svc.ds.query(`SELECT 1 FROM nbd_journal WHERE disk_id = $1`, [uuid(disk)])).toEqual([]));
    for (const c of [w1, w2, r]) c.end();
  });

  it("backs up every write acknowledged before the backup and none after it, and the next backup costs what changed", async () => {
    const disk = await createDisk(svc, "consistent", 4 * MiB);
    const { uri } = await exportOf(disk);
    const w = await RawNbd.connect(svc.nbdPort);
    await w.go(nameOf(uri));
    // Acknowledged but not flushed when the backup is taken.
    w.request(1, 0, 2 * BLOCK, 1, 0, Buffer.alloc(2 * BLOCK, 0xaa));
    expect(await w.reply()).toMatchObject({ error: 0 });
    const before = await svc.ok(`mutation ($r: ID!) { createBackup(input: { resourceId: $r }) { backup { id } job { id } } }`, { r: disk });
    // After the backup's instant.
    w.request(1, BLOCK, 4096, 2, 0, Buffer.alloc(4096, 0xbb));
    expect(await w.reply()).toMatchObject({ error: 0 });
    await succeed(svc, before.createBackup.job.id);
    const first = before.createBackup.backup.id;
    const restored = (await svc.ok(`mutation ($b: ID!) { createDisk(input: { name: "from-backup", backupId: $b }) { disk { id } } }`, { b: first })).createDisk;
    const expected = Buffer.alloc(4 * MiB);
    expected.fill(0xaa, 0, 2 * BLOCK);
    expect(sha(await readDisk(svc, restored.disk.id))).toBe(sha(expected));

    // One more block through NBD: the next backup holds the changed blocks only (block 1 changed after the first backup, and block 40).
    w.request(1, 40 * BLOCK, BLOCK, 3, 1 /* FUA */, bytes(BLOCK, 9));
    expect(await w.reply()).toMatchObject({ error: 0 });
    const second = await backupNow(svc, disk);
    const [{ n }] = await svc.ds.query(`SELECT count(*)::int AS n FROM backup_blocks WHERE backup_id = $1`, [uuid(second)]);
    expect(n).toBe(2);
    w.end();
  });

  it("keeps a disk rewritten 50 times through NBD under twice its size at rest after each compaction pass", async () => {
    const disk = await createDisk(svc, "rewrite", 64 * MiB);
    const { uri } = await exportOf(disk);
    // Passes cycle through five contents, so every pass changes every block.
    const sources = [0, 1, 2, 3, 4].map((k) => {
      const file = path.join(tmp, `rewrite-${k}.raw`);
      fs.writeFileSync(file, bytes(64 * MiB, 100 + k));
      return file;
    });
    let peak = 0;
    const started = Date.now();
    for (let pass = 0; pass < 50; pass++) {
      await run(nbdcopy!, ["--flush", sources[pass % 5], uri]);
      await compactStorage(svc.ds, svc.storage, silentLogger);
      const [{ stored }] = await svc.ds.query(`SELECT coalesce(sum(size_bytes), 0)::bigint AS stored FROM volume_segments WHERE disk_id = $1`, [uuid(disk)]);
      peak = Math.max(peak, Number(stored));
    }
    for (const f of sources) fs.rmSync(f);
    console.log(`50 passes in ${Date.now() - started} ms`);
    expect(peak).toBeLessThan(2 * 64 * MiB);
    expect(sha(await readDisk(svc, disk))).toBe(sha(bytes(64 * MiB, 104)));
  }, 600_000);

  it("counts connections, requests by command and bytes in /metrics", async () => {
    const disk = await createDisk(svc, "metrics", MiB);
    const { uri } = await exportOf(disk);
    await run(qemuIo!, ["-f", "raw", "-c", "write -P 1 0 64k", "-c", "flush", "-c", "read 0 64k", uri]);
    const text = await (await svc.http("/metrics")).text();
    const value = (re: RegExp) => Number(re.exec(text)?.[1] ?? NaN);
    expect(value(/^stowage_nbd_connections_total (\d+)/m)).toBeGreaterThan(0);
    expect(value(/^stowage_nbd_requests_total\{command="WRITE"\} (\d+)/m)).toBeGreaterThan(0);
    expect(value(/^stowage_nbd_requests_total\{command="FLUSH"\} (\d+)/m)).toBeGreaterThan(0);
    expect(value(/^stowage_nbd_bytes_total\{direction="write"\} (\d+)/m)).toBeGreaterThanOrEqual(BLOCK);
    expect(value(/^stowage_nbd_bytes_total\{direction="read"\} (\d+)/m)).toBeGreaterThanOrEqual(BLOCK);
    expect(text).toMatch(/^stowage_nbd_connections \d+/m);
  });
});

describe("NBD configuration", () => {
  it("is refused off loopback without TLS, and createNbdExport says when NBD is off", async () => {
    expect(() => loadConfig({ NBD_HOST: "0.0.0.0" })).toThrow(/not a loopback address: NBD needs TLS/);
    expect(loadConfig({ NBD_HOST: "0.0.0.0", NBD_PORT: "0" }).nbdPort).toBe(0);
    const svc = await startTestService();
    try {
      const disk = await createDisk(svc, "off", MiB);
      const r = await svc.gql(EXPORT, { id: disk, ro: false });
      expect(r.errors?.[0].extensions?.code).toBe("FAILED_PRECONDITION");
      expect(r.errors?.[0].message).toMatch(/NBD_PORT=0/);
    } finally {
      await svc.stop();
    }
  });
});
