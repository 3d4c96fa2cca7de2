import crypto from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { Readable } from "node:stream";
import { BlobNotFoundError, type BlobStore } from "../../src/storage/blob-store";
import { FsBlobStore } from "../../src/storage/fs-blob-store";
import { S3BlobStore } from "../../src/storage/s3-blob-store";
import { startS3 } from "../helpers/s3";

async function collect(stream: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of stream) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

const backends: [string, () => Promise<{ store: BlobStore; stop(): Promise<void> }>][] = [
  [
    "filesystem",
    async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-blobs-"));
      return { store: new FsBlobStore(dir), stop: async () => fs.rmSync(dir, { recursive: true, force: true }) };
    },
  ],
  [
    "S3",
    async () => {
      const s3 = await startS3();
      const store = new S3BlobStore(s3.config, "t/");
      return {
        store,
        stop: async () => {
          store.destroy();
          await s3.stop();
        },
      };
    },
  ],
];

describe.each(backends)("%s blob store", (_name, open) => {
  let store: BlobStore;
  let stop: () => Promise<void>;
  beforeAll(async () => {
    ({ store, stop } = await open());
  });
  afterAll(async () => {
    await stop?.();
  });

  it("stores and reads back a blob, whole and in ranges", async () => {
    const data = crypto.randomBytes(300_000);
    await store.put("packs/ab/abcdef", data);
    expect((await store.get("packs/ab/abcdef")).equals(data)).toBe(true);
    expect((await store.getRange("packs/ab/abcdef", 1000, 5000)).equals(data.subarray(1000, 6000))).toBe(true);
    expect((await collect(await store.getStream("packs/ab/abcdef", { start: 10, end: 19 }))).equals(data.subarray(10, 20))).toBe(true);
    expect(await store.stat("packs/ab/abcdef")).toMatchObject({ key: "packs/ab/abcdef", size: 300_000 });
  });

  it("streams a large blob in and out without holding it", async () => {
    const part = crypto.randomBytes(1 << 20);
    const hash = crypto.createHash("sha256");
    const body = Readable.from(
      (function* () {
        for (let i = 0; i < 20; i++) {
          hash.update(part);
          yield part;
        }
      })(),
    );
    expect(await store.putStream("uploads/big", body)).toBe(20 << 20);
    const out = crypto.createHash("sha256");
    for await (const c of await store.getStream("uploads/big")) out.update(c as Buffer);
    expect(out.digest("hex")).toBe(hash.digest("hex"));
  });

  it("overwrites whole, lists by prefix and deletes", async () => {
    await store.put("list/a/1", Buffer.from("one"));
    await store.put("list/a/2", Buffer.from("two"));
    await store.put("list/b/3", Buffer.from("three"));
    await store.put("list/a/2", Buffer.from("TWO!"));
    const keys: string[] = [];
    for await (const b of store.list("list/a/")) keys.push(`${b.key}:${b.size}`);
    expect(keys.sort()).toEqual(["list/a/1:3", "list/a/2:4"]);
    const all: string[] = [];
    for await (const b of store.list("list/")) all.push(b.key);
    expect(all.sort()).toEqual(["list/a/1", "list/a/2", "list/b/3"]);
    await store.delete("list/a/1");
    await store.delete("list/a/1"); // deleting twice is fine
    expect(await store.stat("list/a/1")).toBeNull();
  });

  it("reports a missing blob as BlobNotFoundError", async () => {
    await expect(store.get("nope/x")).rejects.toBeInstanceOf(BlobNotFoundError);
    await expect(store.getRange("nope/x", 0, 1)).rejects.toBeInstanceOf(BlobNotFoundError);
    await expect(store.getStream("nope/x")).rejects.toBeInstanceOf(BlobNotFoundError);
  });

  it("refuses keys that could escape its root", async () => {
    for (const key of ["../etc/passwd", "/abs", "a/../../b", "a//b", "A/B", "a/.tmp-x", ""]) {
      await expect(store.put(key, Buffer.from("x"))).rejects.toThrow(/invalid blob key/);
    }
  });
});

describe("filesystem blob store crash safety", () => {
  it("leaves no partial blob when a stream fails midway", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-blobs-"));
    const store = new FsBlobStore(dir);
    const failing = new Readable({
      read() {
        this.push(Buffer.alloc(1000));
        this.destroy(new Error("connection reset"));
      },
    });
    await expect(store.putStream("uploads/partial", failing)).rejects.toThrow("connection reset");
    expect(await store.stat("uploads/partial")).toBeNull();
    expect(fs.readdirSync(path.join(dir, "uploads"))).toEqual([]);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("removes the temporary files of writes a dead process left, once older than the cutoff, and nothing else", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-blobs-"));
    const store = new FsBlobStore(dir);
    await store.put("vault/p/packs/ab/abcd", Buffer.from("a finished pack"));
    // What a process killed inside atomicWrite leaves: .tmp-<name>-<random> beside where the blob was going.
    const abandoned = path.join(dir, "vault/p/packs/ab/.tmp-abef-0123456789ab");
    const fresh = path.join(dir, "vault/p/packs/ab/.tmp-abff-0123456789ac");
    const elsewhere = path.join(dir, "vault/q/packs/cd/.tmp-cdef-0123456789ad");
    fs.mkdirSync(path.dirname(elsewhere), { recursive: true });
    for (const f of [abandoned, fresh, elsewhere]) fs.writeFileSync(f, Buffer.alloc(100));
    const old = new Date(Date.now() - 3600_000);
    for (const f of [abandoned, elsewhere]) fs.utimesSync(f, old, old);

    const keys: string[] = [];
    for await (const b of store.list("vault/p/packs/")) keys.push(b.key);
    expect(keys).toEqual(["vault/p/packs/ab/abcd"]);

    expect(await store.removeIncomplete("vault/p/packs/", new Date(Date.now() - 60_000))).toEqual({ count: 1, bytes: 100 });
    expect(fs.existsSync(abandoned)).toBe(false);
    expect(fs.existsSync(fresh)).toBe(true); // maybe a write in progress
    expect(fs.existsSync(elsewhere)).toBe(true); // another prefix
    expect((await store.get("vault/p/packs/ab/abcd")).toString()).toBe("a finished pack");
    fs.rmSync(dir, { recursive: true, force: true });
  });
});

describe("filesystem blob store reads of kept files", () => {
  let dir: string;
  let store: FsBlobStore;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-blobs-"));
    store = new FsBlobStore(dir);
  });
  afterEach(() => {
    jest.restoreAllMocks();
    store.closeFiles();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("reads a block or less on the event loop and more in the thread pool, the same bytes either way", async () => {
    const data = crypto.randomBytes(1024 * 1024);
    await store.put("volumes/d/s", data);
    const sync = jest.spyOn(fs, "readSync");
    const pooled = jest.spyOn(fs, "read");

    for (const [offset, length] of [
      [0, 4096],
      [123_457, 65_536],
      [data.length - 100, 100],
    ]) {
      const buf = Buffer.alloc(length);
      await store.readFixedInto("volumes/d/s", offset, buf);
      expect(buf.equals(data.subarray(offset, offset + length))).toBe(true);
    }
    expect(sync).toHaveBeenCalledTimes(3);
    expect(pooled).not.toHaveBeenCalled();

    const big = Buffer.alloc(65_537);
    await store.readFixedInto("volumes/d/s", 7, big);
    expect(big.equals(data.subarray(7, 7 + big.length))).toBe(true);
    expect(pooled).toHaveBeenCalledTimes(1);
    expect(sync).toHaveBeenCalledTimes(3);
  });

  it("reports a missing or deleted blob as BlobNotFoundError on either path, and a read past its end as an error", async () => {
    await store.put("volumes/d/s", Buffer.alloc(200_000, 7));
    await store.readFixedInto("volumes/d/s", 0, Buffer.alloc(10)); // kept open now
    await store.delete("volumes/d/s");
    for (const n of [4096, 100_000]) {
      await expect(store.readFixedInto("volumes/d/s", 0, Buffer.alloc(n))).rejects.toBeInstanceOf(BlobNotFoundError);
      await expect(store.readFixedInto("volumes/d/none", 0, Buffer.alloc(n))).rejects.toBeInstanceOf(BlobNotFoundError);
    }
    await store.put("volumes/d/short", Buffer.alloc(1000, 1));
    await expect(store.readFixedInto("volumes/d/short", 900, Buffer.alloc(200))).rejects.toThrow(/shorter than 1100 bytes/);
    await expect(store.readFixedInto("volumes/d/short", 900, Buffer.alloc(100_000))).rejects.toThrow(/shorter than 100900 bytes/);
  });
});
