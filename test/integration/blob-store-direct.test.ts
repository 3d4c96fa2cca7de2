import fs from "node:fs";
import fsp from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { BlobNotFoundError, type BlobWriter } from "../../src/storage/blob-store";
import { FsBlobStore } from "../../src/storage/fs-blob-store";
import { bytes, sha } from "../helpers/data";

const MiB = 1024 * 1024;
/** The store keeps 12 aligned staging windows of 2 MiB and gives each direct writer 4 of them. */
const DIRECT_WRITERS = 3;

/** Whether a file system takes O_DIRECT at all (when not, every writer falls back, and only the bytes are checked). */
function directSupported(dir: string): boolean {
  if (!fs.constants.O_DIRECT) return false;
  const probe = path.join(dir, "direct-support-probe");
  try {
    fs.closeSync(fs.openSync(probe, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_DIRECT, 0o600));
    return true;
  } catch {
    return false;
  } finally {
    fs.rmSync(probe, { force: true });
  }
}

/**
 * The temporary files this process holds open under `dir`, their descriptors, and
 * whether each was opened with O_DIRECT (from /proc/self/fdinfo; null where there is no /proc).
 */
function openTemporaries(dir: string): { file: string; fd: number; direct: boolean }[] | null {
  if (!fs.existsSync("/proc/self/fdinfo")) return null;
  const out: { file: string; fd: number; direct: boolean }[] = [];
  for (const fd of fs.readdirSync("/proc/self/fd")) {
    let file: string;
    let info: string;
    try {
      file = fs.readlinkSync(`/proc/self/fd/${fd}`);
      info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, "utf8");
    } catch {
      continue; // closed meanwhile
    }
    if (!file.startsWith(dir + path.sep) || !path.basename(file).startsWith(".tmp-")) continue;
    const flags = parseInt(/^flags:\s*([0-7]+)/m.exec(info)![1], 8);
    out.push({ file, fd: Number(fd), direct: (flags & fs.constants.O_DIRECT) !== 0 });
  }
  return out;
}

/** All files under `dir`, relative. */
function filesUnder(dir: string): string[] {
  if (!fs.existsSync(dir)) return [];
  return (fs.readdirSync(dir, { recursive: true, withFileTypes: true }) as fs.Dirent[])
    .filter((e) => e.isFile())
    .map((e) => path.relative(dir, path.join(e.parentPath, e.name)))
    .sort();
}

/**
 * Writes `content` in pieces of the given sizes (a number: one buffer; an array: a
 * list of buffers in one call), from one scratch buffer overwritten once each
 * write resolves: the writer must have taken the bytes by then.
 */
async function writePieces(w: BlobWriter, content: Buffer, pieces: (number | number[])[]): Promise<void> {
  const scratch = Buffer.alloc(content.length);
  let pos = 0;
  for (const p of pieces) {
    const sizes = Array.isArray(p) ? p : [p];
    const parts: Buffer[] = [];
    let at = 0;
    for (const n of sizes) {
      content.copy(scratch, at, pos, pos + n);
      parts.push(scratch.subarray(at, at + n));
      at += n;
      pos += n;
    }
    await w.write(Array.isArray(p) ? parts : parts[0]);
    scratch.fill(0xa5, 0, at);
  }
  expect(pos).toBe(content.length);
}

describe("filesystem blob store, writes that bypass the page cache", () => {
  let dir: string;
  let store: FsBlobStore;
  let direct: boolean;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-direct-"));
    direct = directSupported(dir);
    store = new FsBlobStore(dir);
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Whether the open temporary file of the one writer open under `sub` uses O_DIRECT. */
  const writesDirect = (sub: string) => {
    const open = openTemporaries(path.join(dir, sub));
    if (!open) return null;
    expect(open).toHaveLength(1);
    return open[0].direct;
  };

  it.each([0, 1, 4095, 4096, 4097, 4 * MiB - 1, 4 * MiB, 4 * MiB + 1])("writes a blob of %i bytes in one piece that reads back identical", async (size) => {
    const content = bytes(size, size + 1);
    const key = `sizes/b${size}`;
    const w = await store.openWriter(key, { bypassCache: true });
    if (direct) expect(writesDirect("sizes")).not.toBe(false);
    if (size > 0) await w.write(content);
    expect(await w.close()).toBe(size);
    expect(await store.stat(key)).toMatchObject({ key, size });
    expect((await store.get(key)).equals(content)).toBe(true);
    expect(filesUnder(path.join(dir, "sizes")).filter((f) => f.startsWith(".tmp"))).toEqual([]);
  });

  it("writes 5 MiB + 123 bytes in mixed pieces, single buffers and lists, across the 2 MiB staging windows", async () => {
    const total = 5 * MiB + 123;
    const content = bytes(total, 77);
    const pieces: (number | number[])[] = [1, 4095, [7, 4096, 65536], 1000, MiB - 3, [2 * MiB, 0, 5], 1, MiB + 333];
    const used = pieces.flat().reduce((a, b) => a + b, 0);
    pieces.push([total - used - 1000, 1000]);
    const w = await store.openWriter("mixed/five", { bypassCache: true });
    if (direct) expect(writesDirect("mixed")).toBe(true);
    await writePieces(w, content, pieces);
    expect(await w.close()).toBe(total);
    const back = await store.get("mixed/five");
    expect(back.length).toBe(total);
    expect(sha(back)).toBe(sha(content));
  });

  it("writes past several windows, reusing each, and pieces larger than a window", async () => {
    const total = 13 * MiB + 4097;
    const content = bytes(total, 78);
    const pieces = [3 * MiB, 6 * MiB + 1, [MiB, 4095], 3 * MiB + 1];
    const w = await store.openWriter("mixed/thirteen", { bypassCache: true });
    await writePieces(w, content, pieces);
    expect(await w.close()).toBe(total);
    expect(sha(await store.get("mixed/thirteen"))).toBe(sha(content));
  });

  it("shows nothing of the blob before close: not listed, stat null, not readable", async () => {
    const content = bytes(5 * MiB + 10, 79);
    const w = await store.openWriter("hidden/blob", { bypassCache: true });
    await w.write(content);
    const listed: string[] = [];
    for await (const b of store.list("hidden/")) listed.push(b.key);
    expect(listed).toEqual([]);
    expect(await store.stat("hidden/blob")).toBeNull();
    await expect(store.get("hidden/blob")).rejects.toBeInstanceOf(BlobNotFoundError);
    await expect(store.readInto("hidden/blob", 0, Buffer.alloc(10))).rejects.toBeInstanceOf(BlobNotFoundError);
    expect(await w.close()).toBe(content.length);
    for await (const b of store.list("hidden/")) listed.push(`${b.key}:${b.size}`);
    expect(listed).toEqual([`hidden/blob:${content.length}`]);
    expect(sha(await store.get("hidden/blob"))).toBe(sha(content));
  });

  it("abort leaves nothing behind: no blob, no temporary file, and the key can be written again", async () => {
    for (const size of [0, 3000, 4 * MiB + 5, 9 * MiB]) {
      const w = await store.openWriter("aborted/blob", { bypassCache: true });
      if (size) await w.write(bytes(size, 80));
      await w.abort();
      expect(await store.stat("aborted/blob")).toBeNull();
      expect(filesUnder(path.join(dir, "aborted"))).toEqual([]);
      expect(openTemporaries(path.join(dir, "aborted")) ?? []).toEqual([]);
    }
    const w = await store.openWriter("aborted/blob", { bypassCache: true });
    await w.write(Buffer.from("second try"));
    expect(await w.close()).toBe(10);
    expect((await store.get("aborted/blob")).toString()).toBe("second try");
  });

  it("runs more writers at once than it has windows for: the rest write through the page cache, and all blobs are right", async () => {
    const n = DIRECT_WRITERS + 3;
    const contents = Array.from({ length: n }, (_, i) => bytes(4 * MiB + 1000 * i + 1, 90 + i));
    const writers: BlobWriter[] = [];
    for (let i = 0; i < n; i++) writers.push(await store.openWriter(`many/w${i}`, { bypassCache: true }));
    const open = openTemporaries(path.join(dir, "many"));
    if (open) {
      expect(open).toHaveLength(n);
      expect(open.filter((o) => o.direct)).toHaveLength(direct ? DIRECT_WRITERS : 0);
    }
    // Interleave pieces of every writer.
    const step = 700 * 1024 + 3;
    for (let pos = 0; pos < contents[n - 1].length; pos += step) {
      await Promise.all(writers.map((w, i) => (pos < contents[i].length ? w.write(contents[i].subarray(pos, pos + step)) : Promise.resolve())));
    }
    const sizes = await Promise.all(writers.map((w) => w.close()));
    expect(sizes).toEqual(contents.map((c) => c.length));
    for (let i = 0; i < n; i++) expect(sha(await store.get(`many/w${i}`))).toBe(sha(contents[i]));

    // Closed writers give their windows back: as many direct writers as before can open.
    const again: BlobWriter[] = [];
    for (let i = 0; i < DIRECT_WRITERS; i++) again.push(await store.openWriter(`many/again${i}`, { bypassCache: true }));
    const reopened = openTemporaries(path.join(dir, "many"));
    if (reopened && direct) expect(reopened.filter((o) => o.direct)).toHaveLength(DIRECT_WRITERS);
    for (const w of again) await w.abort();
    // So do aborted ones.
    const third: BlobWriter[] = [];
    for (let i = 0; i < DIRECT_WRITERS; i++) third.push(await store.openWriter(`many/third${i}`, { bypassCache: true }));
    const thirdOpen = openTemporaries(path.join(dir, "many"));
    if (thirdOpen && direct) expect(thirdOpen.filter((o) => o.direct)).toHaveLength(DIRECT_WRITERS);
    await Promise.all(third.map((w, i) => w.write(contents[i].subarray(0, 12345))));
    expect(await Promise.all(third.map((w) => w.close()))).toEqual(third.map(() => 12345));
    for (let i = 0; i < DIRECT_WRITERS; i++) expect((await store.get(`many/third${i}`)).equals(contents[i].subarray(0, 12345))).toBe(true);
  });

  it("writes a blob larger than all its windows with every window's write in flight, taking each back in order", async () => {
    // 4 windows of 2 MiB: the fifth window's worth of bytes waits for the first write, and so on.
    const total = 29 * MiB + 11;
    const content = bytes(total, 82);
    const w = await store.openWriter("ring/blob", { bypassCache: true });
    await writePieces(w, content, [4 * MiB, 4 * MiB, 4 * MiB, 4 * MiB, 3 * MiB, [5 * MiB, MiB], 4 * MiB + 11]);
    expect(await w.close()).toBe(total);
    expect(sha(await store.get("ring/blob"))).toBe(sha(content));
  });

  it("writes direct from page-aligned memory: every write starts on a page of one WebAssembly memory", async () => {
    if (!direct) return expect(direct).toBe(false); // nothing goes direct here; the bytes are checked by the other tests
    const sub = fs.mkdtempSync(path.join(dir, "aligned-"));
    const fresh = new FsBlobStore(sub);
    const w = await fresh.openWriter("a/blob", { bypassCache: true });
    const [{ fd, direct: tmpDirect }] = openTemporaries(path.join(sub, "a"))!;
    expect(tmpDirect).toBe(true);
    const handle = await fsp.open(path.join(sub, "unused"), "w");
    await handle.close();
    const proto = Object.getPrototypeOf(handle) as fsp.FileHandle;
    const write = proto.write;
    /** The buffers of writes to the blob's file (`fd` is gone once the writer closes it). */
    const mine: Buffer[] = [];
    const spy = jest.spyOn(proto, "write").mockImplementation(function (this: fsp.FileHandle, ...args: unknown[]) {
      if (this.fd === fd) mine.push(args[0] as Buffer);
      return (write as (...a: unknown[]) => ReturnType<fsp.FileHandle["write"]>).apply(this, args);
    } as fsp.FileHandle["write"]);
    try {
      const content = bytes(5 * MiB + 3 * 4096 + 17, 86);
      await writePieces(w, content, [4096 + 5, [MiB, 3 * MiB], 2 * 4096, MiB + 12]);
      expect(await w.close()).toBe(content.length);
      expect((await fresh.get("a/blob")).equals(content)).toBe(true);
      expect(mine.length).toBeGreaterThanOrEqual(3);
      for (const buf of mine) expect(buf.byteOffset % 4096).toBe(0);
      // Windows are carved from one memory that starts on a page: a WebAssembly memory (whole 64 KiB pages).
      expect(new Set(mine.map((buf) => buf.buffer)).size).toBe(1);
      expect(mine[0].buffer.byteLength % 65536).toBe(0);
    } finally {
      spy.mockRestore();
    }
  });

  it("prepare sets up the direct windows ahead: the first direct writer then probes nothing", async () => {
    const probes = async (prepare: boolean) => {
      const sub = fs.mkdtempSync(path.join(dir, "prepare-"));
      const fresh = new FsBlobStore(sub);
      // What a process killed while probing left behind.
      fs.writeFileSync(path.join(sub, ".tmp-direct-probe-0123456789ab"), bytes(8192, 84));
      if (prepare) {
        await fresh.prepare();
        if (direct) expect(fs.readdirSync(sub)).toEqual([]);
      }
      const open = jest.spyOn(fsp, "open");
      try {
        const w = await fresh.openWriter("p/blob", { bypassCache: true });
        if (direct) expect(openTemporaries(path.join(sub, "p"))).toEqual([expect.objectContaining({ direct: true })]);
        await w.write(bytes(5000, 83));
        expect(await w.close()).toBe(5000);
        return open.mock.calls.filter(([file]) => String(file).includes(".tmp-direct-probe")).length;
      } finally {
        open.mockRestore();
      }
    };
    // Without prepare, the first direct writer looks for the windows itself.
    expect(await probes(false)).toBe(direct ? 1 : 0);
    expect(await probes(true)).toBe(0);
  });

  it("writes without bypassCache through the page cache", async () => {
    const w = await store.openWriter("cached/blob");
    expect(writesDirect("cached")).not.toBe(true);
    await writePieces(w, bytes(MiB + 7, 81), [1, [MiB, 6]]);
    expect(await w.close()).toBe(MiB + 7);
    expect((await store.get("cached/blob")).equals(bytes(MiB + 7, 81))).toBe(true);
  });
});

describe("filesystem blob store readInto", () => {
  let dir: string;
  let store: FsBlobStore;
  const content = bytes(300_000, 5);
  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-readinto-"));
    store = new FsBlobStore(dir);
    await store.put("r/blob", content);
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("fills the buffer with the bytes from the offset on", async () => {
    for (const [offset, length] of [
      [0, content.length],
      [0, 1],
      [12345, 100_000],
      [content.length - 1, 1],
      [content.length, 0],
    ]) {
      const buf = Buffer.alloc(length, 0xee);
      await store.readInto("r/blob", offset, buf);
      expect(buf.equals(content.subarray(offset, offset + length))).toBe(true);
    }
    // Into part of a larger buffer, leaving the rest alone.
    const big = Buffer.alloc(1000, 0xee);
    await store.readInto("r/blob", 500, big.subarray(100, 200));
    expect(big.subarray(100, 200).equals(content.subarray(500, 600))).toBe(true);
    expect(big.subarray(0, 100).equals(Buffer.alloc(100, 0xee))).toBe(true);
    expect(big.subarray(200).equals(Buffer.alloc(800, 0xee))).toBe(true);
  });

  it("throws for a range past the end of the blob", async () => {
    await expect(store.readInto("r/blob", content.length - 10, Buffer.alloc(11))).rejects.toThrow(/shorter than 300001 bytes/);
    await expect(store.readInto("r/blob", content.length, Buffer.alloc(1))).rejects.toThrow(/shorter than/);
    await expect(store.readInto("r/blob", content.length + 5000, Buffer.alloc(10))).rejects.toThrow(/shorter than/);
    await expect(store.getRange("r/blob", 299_000, 2000)).rejects.toThrow(/shorter than/);
  });

  it("throws BlobNotFoundError for a missing blob", async () => {
    await expect(store.readInto("r/missing", 0, Buffer.alloc(1))).rejects.toBeInstanceOf(BlobNotFoundError);
  });
});
