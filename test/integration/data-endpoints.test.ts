import { BLOCK, bytes, createDisk, putDisk, readDisk, writeDisk } from "../helpers/data";
import { MiB, startTestService, type TestService } from "../helpers/service";

let svc: TestService;
beforeAll(async () => {
  svc = await startTestService();
});
afterAll(async () => {
  await svc?.stop();
});

const usedBytes = async (id: string) => (await svc.ok(`query ($id: ID!) { node(id: $id) { ... on Disk { usedBytes } } }`, { id })).node.usedBytes;

it("reads a new disk as zeros and stores nothing for it", async () => {
  const disk = await createDisk(svc, "blank", 4 * MiB);
  const data = await readDisk(svc, disk);
  expect(data.length).toBe(4 * MiB);
  expect(data.equals(Buffer.alloc(4 * MiB))).toBe(true);
  expect(await usedBytes(disk)).toBe(0);
});

it("writes at offset 0 and at any Content-Range, unaligned, and reads back byte for byte", async () => {
  const disk = await createDisk(svc, "rw", 4 * MiB);
  const expected = Buffer.alloc(4 * MiB);
  const a = bytes(300_000, 1);
  await writeDisk(svc, disk, a);
  a.copy(expected, 0);
  const b = bytes(100_001, 2);
  await writeDisk(svc, disk, b, 1_000_003); // starts and ends inside blocks
  b.copy(expected, 1_000_003);
  const c = bytes(7, 3);
  await writeDisk(svc, disk, c, 4 * MiB - 7); // the very end
  c.copy(expected, 4 * MiB - 7);
  expect((await readDisk(svc, disk)).equals(expected)).toBe(true);
  // Only the blocks touched cost anything.
  const touched = new Set<number>();
  for (const [off, len] of [
    [0, a.length],
    [1_000_003, b.length],
    [4 * MiB - 7, 7],
  ]) {
    for (let i = Math.floor(off / BLOCK); i <= Math.floor((off + len - 1) / BLOCK); i++) touched.add(i);
  }
  expect(await usedBytes(disk)).toBe(touched.size * BLOCK);
});

it("honours Range on reads with 206, suffix ranges and 416 outside the disk", async () => {
  const disk = await createDisk(svc, "ranges", 2 * MiB);
  const data = bytes(2 * MiB, 4);
  await writeDisk(svc, disk, data);
  const res = await svc.http(`/v1/disks/${disk}/data`, { headers: { range: "bytes=70000-70099" } });
  expect(res.status).toBe(206);
  expect(res.headers.get("content-range")).toBe(`bytes 70000-70099/${2 * MiB}`);
  expect(Buffer.from(await res.arrayBuffer()).equals(data.subarray(70000, 70100))).toBe(true);
  expect((await readDisk(svc, disk, [2 * MiB - 10, 2 * MiB + 500])).equals(data.subarray(2 * MiB - 10))).toBe(true);
  const suffix = await svc.http(`/v1/disks/${disk}/data`, { headers: { range: "bytes=-5" } });
  expect(Buffer.from(await suffix.arrayBuffer()).equals(data.subarray(2 * MiB - 5))).toBe(true);
  const outside = await svc.http(`/v1/disks/${disk}/data`, { headers: { range: `bytes=${2 * MiB}-` } });
  expect(outside.status).toBe(416);
  expect(outside.headers.get("content-range")).toBe(`bytes */${2 * MiB}`);
});

it("refuses writes past the end and changes nothing", async () => {
  const disk = await createDisk(svc, "bounds", MiB);
  const before = bytes(MiB, 5);
  await writeDisk(svc, disk, before);
  const past = await putDisk(svc, disk, bytes(2 * BLOCK, 6), MiB - BLOCK);
  expect(past.status).toBe(416);
  expect(((await past.json()) as { error: { code: string } }).error.code).toBe("BAD_USER_INPUT");
  const tooBig = await putDisk(svc, disk, bytes(MiB + 1, 7));
  expect(tooBig.status).toBe(416);
  expect((await readDisk(svc, disk)).equals(before)).toBe(true);
});

it("refuses malformed ranges, bodies that disagree with them, and missing lengths", async () => {
  const disk = await createDisk(svc, "malformed", MiB);
  const bad = await svc.http(`/v1/disks/${disk}/data`, { method: "PUT", body: new Uint8Array(10), headers: { "content-range": "bytes 10-5/*" } });
  expect(bad.status).toBe(400);
  const mismatch = await svc.http(`/v1/disks/${disk}/data`, { method: "PUT", body: new Uint8Array(10), headers: { "content-range": "bytes 0-19/*" } });
  expect(mismatch.status).toBe(400);
  expect((await readDisk(svc, disk)).equals(Buffer.alloc(MiB))).toBe(true);
});

it("answers 404 for another project's disk, unknown IDs and non-disk IDs, and 401 without a key", async () => {
  const disk = await createDisk(svc, "private", MiB);
  await writeDisk(svc, disk, bytes(1000, 8));
  const other = await svc.http(`/v1/disks/${disk}/data`, { key: svc.keys.beta });
  expect(other.status).toBe(404);
  const otherPut = await putDisk(svc, disk, bytes(1000, 9), 0, svc.keys.beta);
  expect(otherPut.status).toBe(404);
  expect((await svc.http(`/v1/disks/nonsense/data`)).status).toBe(404);
  const server = (await svc.ok(`mutation { createServer(input: { name: "s", vcpus: 1, memoryMiB: 512, systemDiskSizeBytes: ${MiB} }) { server { id } } }`)).createServer.server.id;
  expect((await svc.http(`/v1/disks/${server}/data`)).status).toBe(404);
  expect((await svc.http(`/v1/disks/${disk}/data`, { key: null })).status).toBe(401);
  expect((await readDisk(svc, disk, [0, 999])).equals(bytes(1000, 8))).toBe(true);
});

it("writing zeros over data frees the blocks", async () => {
  const disk = await createDisk(svc, "trim", MiB);
  await writeDisk(svc, disk, bytes(4 * BLOCK, 10));
  expect(await usedBytes(disk)).toBe(4 * BLOCK);
  await writeDisk(svc, disk, Buffer.alloc(2 * BLOCK), BLOCK);
  expect(await usedBytes(disk)).toBe(2 * BLOCK);
  const data = await readDisk(svc, disk, [0, 4 * BLOCK - 1]);
  expect(data.subarray(BLOCK, 3 * BLOCK).equals(Buffer.alloc(2 * BLOCK))).toBe(true);
  expect(data.subarray(0, BLOCK).equals(bytes(4 * BLOCK, 10).subarray(0, BLOCK))).toBe(true);
});

it("stores a sparse disk at the cost of what was written", async () => {
  const disk = await createDisk(svc, "huge", 1024 * 1024 * MiB); // 1 TiB
  await writeDisk(svc, disk, bytes(10 * MiB, 11), 512 * 1024 * MiB);
  expect(await usedBytes(disk)).toBe(10 * MiB);
  const [{ total }] = await svc.ds.query(`SELECT coalesce(sum(s.size_bytes), 0)::bigint AS total FROM volume_segments s JOIN disks d ON d.id = s.disk_id WHERE d.name = 'huge'`);
  expect(Number(total)).toBe(10 * MiB);
  expect((await readDisk(svc, disk, [512 * 1024 * MiB - 5, 512 * 1024 * MiB + 4])).equals(Buffer.concat([Buffer.alloc(5), bytes(5, 11)]))).toBe(true);
});

describe("reading a disk (readTo)", () => {
  const uuidOf = (id: string) => Buffer.from(id, "base64url").toString().split(":")[1];

  it("hands over every byte in order from two reused buffers, each refilled only once its piece is sent", async () => {
    const size = 40 * MiB;
    const disk = await createDisk(svc, "read-to", size);
    const expected = Buffer.alloc(size);
    // Data, holes, a block written twice (so two segments interleave) and an unaligned tail.
    for (const [off, len, seed] of [
      [0, 5 * MiB, 21],
      [9 * MiB + 4096, 7 * MiB, 22],
      [30 * MiB, 10 * MiB, 23],
      [12 * MiB, BLOCK, 24],
    ]) {
      const data = bytes(len, seed);
      await writeDisk(svc, disk, data, off);
      data.copy(expected, off);
    }
    const start = 1_000_001;
    const end = size - 77;
    const got: Buffer[] = [];
    const memory = new Set<ArrayBufferLike>();
    let at = start;
    await svc.storage.volumes.readTo(uuidOf(disk), start, end, async (piece) => {
      memory.add(piece.buffer);
      const copy = Buffer.from(piece);
      // A slow client: the piece must stay as it was while it is being sent.
      await new Promise((r) => setTimeout(r, 5));
      expect(piece.equals(copy)).toBe(true);
      expect(copy.equals(expected.subarray(at, at + copy.length))).toBe(true);
      at += copy.length;
      got.push(copy);
    });
    expect(at).toBe(end + 1);
    expect(Buffer.concat(got).equals(expected.subarray(start, end + 1))).toBe(true);
    expect(got.length).toBeGreaterThan(5);
    expect(memory.size).toBeLessThanOrEqual(2);
  });

  it("stops when the piece cannot be sent, and the disk reads again afterwards", async () => {
    const disk = await createDisk(svc, "read-to-fail", 16 * MiB);
    const data = bytes(16 * MiB, 25);
    await writeDisk(svc, disk, data);
    let pieces = 0;
    await expect(
      svc.storage.volumes.readTo(uuidOf(disk), 0, 16 * MiB - 1, async () => {
        if (++pieces === 2) throw new Error("the client went away");
      }),
    ).rejects.toThrow("the client went away");
    expect(pieces).toBe(2);
    expect((await readDisk(svc, disk)).equals(data)).toBe(true);
  });
});
