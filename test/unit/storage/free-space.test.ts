import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { DomainError, ErrorCode } from "../../../src/domain/errors";
import type { BlobStore } from "../../../src/storage/blob-store";
import { FreeSpace } from "../../../src/storage/free-space";
import { FsBlobStore } from "../../../src/storage/fs-blob-store";
import { S3BlobStore } from "../../../src/storage/s3-blob-store";

/** A real file-system store that counts how often its free space is asked for. */
class CountingStore extends FsBlobStore {
  asked = 0;
  override async freeBytes(): Promise<number> {
    this.asked++;
    return super.freeBytes();
  }
}

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-free-"));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** The size of the file system under `dir`: always more than it has free. */
const total = (p: string) => {
  const st = fs.statfsSync(p);
  return st.blocks * st.bsize;
};

describe("FreeSpace", () => {
  it("measures what the file system under a store has available to us", async () => {
    const store = new FsBlobStore(dir);
    const st = fs.statfsSync(dir);
    const free = await store.freeBytes();
    // Other processes write meanwhile; the measure is bavail (not the root-reserved bfree) within a few MiB.
    expect(Math.abs(free - st.bavail * st.bsize)).toBeLessThan(64 * 2 ** 20);
    expect(await new FreeSpace([store], 1).least()).toBeGreaterThan(0);
  });

  it("refuses with NO_SPACE below the floor, without a path in the message, and lets everything through at or under it", async () => {
    const store = new FsBlobStore(dir);
    const space = new FreeSpace([store], total(dir));
    const err = await space.check().then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(DomainError);
    expect((err as DomainError).code).toBe(ErrorCode.NO_SPACE);
    expect((err as DomainError).message).toMatch(/less than [\d.]+ GiB free/);
    expect((err as DomainError).message).not.toContain(dir);
    expect((err as DomainError).message).not.toContain(os.tmpdir());
    space.minFreeBytes = 1;
    await expect(space.check()).resolves.toBeUndefined();
  });

  it("asks each store at most once a second, one measurement for callers at the same time", async () => {
    const store = new CountingStore(dir);
    let now = 1_000_000;
    const space = new FreeSpace([store, store], total(dir), () => now);
    const results = await Promise.allSettled(Array.from({ length: 20 }, () => space.check()));
    expect(results.every((r) => r.status === "rejected")).toBe(true);
    expect(store.asked).toBe(1);
    now += 999;
    await expect(space.check()).rejects.toThrow(DomainError);
    expect(store.asked).toBe(1);
    // A moved floor applies at once to the measurement in hand.
    space.minFreeBytes = 1;
    await space.check();
    expect(store.asked).toBe(1);
    now += 1;
    await space.check();
    expect(store.asked).toBe(2);
  });

  it("with a floor of 0 never measures", async () => {
    const store = new CountingStore(dir);
    await new FreeSpace([store], 0).check();
    expect(store.asked).toBe(0);
  });

  it("does not guard a store that cannot tell its free space (S3), but still guards the local one beside it", async () => {
    const s3 = new S3BlobStore({ bucket: "unused", endpoint: "http://127.0.0.1:9", region: "us-east-1", accessKeyId: "x", secretAccessKey: "x", forcePathStyle: true });
    try {
      expect((s3 as BlobStore).freeBytes).toBeUndefined();
      const huge = Number.MAX_SAFE_INTEGER;
      await expect(new FreeSpace([s3], huge).check()).resolves.toBeUndefined();
      expect(await new FreeSpace([s3], huge).least()).toBeNull();
      await expect(new FreeSpace([s3, new FsBlobStore(dir)], huge).check()).rejects.toMatchObject({ code: ErrorCode.NO_SPACE });
    } finally {
      s3.destroy();
    }
  });
});
