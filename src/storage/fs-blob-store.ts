import crypto from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { BlobNotFoundError, checkKey, checkPrefix, type BlobInfo, type BlobStore, type BlobWriter } from "./blob-store";
import { SYNC_READ_BYTES, SyncReads } from "./sync-reads";

const WRITE_BATCH = 1024 * 1024;

/** Writes buffers back to back at `position` with as few system calls as it can; returns the bytes written. */
async function writeAll(fh: fsp.FileHandle, parts: Buffer[], position: number): Promise<number> {
  let total = 0;
  const queue = parts.filter((p) => p.length > 0);
  let first = 0;
  while (first < queue.length) {
    const { bytesWritten } = await fh.writev(queue.slice(first, first + 512), position + total);
    total += bytesWritten;
    let left = bytesWritten;
    while (first < queue.length && left >= queue[first].length) left -= queue[first++].length;
    if (left > 0) queue[first] = queue[first].subarray(left);
  }
  return total;
}

/** Direct I/O wants file offsets and lengths in whole blocks, and memory aligned to a page to be fast. */
const ALIGN = 4096;
const WINDOW_BYTES = 2 * 1024 * 1024;
const WINDOWS = 12;
/** Windows one writer takes when it can (at least two): all but one may be being written at once. */
const WRITER_WINDOWS = 4;
const PROBE_PREFIX = ".tmp-direct-probe-";

/**
 * Page-aligned memory of at least `bytes`. Direct I/O wants page-aligned buffers
 * to be fast: the kernel here accepts memory aligned to 512 bytes and writes it at a
 * third of the speed. JavaScript cannot see an address and a Buffer's memory comes
 * from malloc, aligned to 16 bytes; a WebAssembly memory is mapped by V8 on pages
 * of its own, so offset 0 of one is page-aligned. Null where WebAssembly is off
 * (node --jitless).
 */
function pageAlignedMemory(bytes: number): Buffer | null {
  const wasm = (globalThis as { WebAssembly?: { Memory: new (size: { initial: number; maximum: number }) => { buffer: ArrayBuffer } } }).WebAssembly;
  if (!wasm) return null;
  const pages = Math.ceil(bytes / 65536); // WebAssembly pages
  try {
    return Buffer.from(new wasm.Memory({ initial: pages, maximum: pages }).buffer, 0, bytes);
  } catch {
    return null; // no room to map it (a capped address space)
  }
}

/**
 * Page-aligned staging windows for writes that bypass the page cache, carved
 * from one allocation. Null when the file system has no direct I/O (one direct
 * write of a block to a probe file tells), or no aligned memory can be had.
 */
async function directWindows(dir: string): Promise<Buffer[] | null> {
  if (!fs.constants.O_DIRECT) return null;
  const mem = pageAlignedMemory(WINDOWS * WINDOW_BYTES);
  if (!mem) return null;
  // Probes a killed process left behind go (one another process is running keeps its open file).
  for (const name of await fsp.readdir(dir).catch(() => [] as string[])) if (name.startsWith(PROBE_PREFIX)) await fsp.rm(path.join(dir, name), { force: true });
  const probe = path.join(dir, `${PROBE_PREFIX}${crypto.randomBytes(6).toString("hex")}`);
  const fh = await fsp.open(probe, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_DIRECT, 0o600).catch(() => null);
  if (!fh) return null;
  try {
    await fh.write(mem, 0, ALIGN, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EINVAL") return null;
    throw err;
  } finally {
    await fh.close();
    await fsp.rm(probe, { force: true });
  }
  return Array.from({ length: WINDOWS }, (_, i) => mem.subarray(i * WINDOW_BYTES, (i + 1) * WINDOW_BYTES));
}

/**
 * Writes a blob with O_DIRECT, past the page cache: bytes are copied into
 * aligned staging windows and written in whole blocks, the device writing up to
 * all but one window while the next fills, so it never waits for the writer to
 * notice that a write ended. The last partial block is written padded and the
 * file truncated to its size. When the file system refuses a direct write, the
 * rest goes through an ordinary descriptor of the same file.
 */
class DirectWriter implements BlobWriter {
  private size = 0;
  /** Bytes in the filling window (`free[0]`) not yet written. */
  private held = 0;
  private buffered: Promise<fsp.FileHandle> | null = null;
  /** Writes in flight, oldest first, with their windows. */
  private writing: { win: Buffer; done: Promise<void> }[] = [];

  constructor(
    private readonly t: { fh: fsp.FileHandle; tmp: string; commit(): Promise<void>; abort(): Promise<void> },
    /** Windows not being written; the first one fills. At least two in all. */
    private free: Buffer[] | null,
    private readonly release: (wins: Buffer[]) => void,
  ) {}

  /** Writes `length` bytes of `win` (a whole number of blocks) at `position`, or through the ordinary descriptor. */
  private async put(win: Buffer, length: number, position: number, real: number): Promise<void> {
    if (!this.buffered) {
      try {
        let done = 0;
        while (done < length) done += (await this.t.fh.write(win, done, length - done, position + done)).bytesWritten;
        return;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== "EINVAL") throw err;
        this.buffered ??= fsp.open(this.t.tmp, "r+");
      }
    }
    await writeAll(await this.buffered, [win.subarray(0, real)], position);
  }

  /** Waits for the oldest write in flight and takes its window back. */
  private async reclaim(): Promise<void> {
    const w = this.writing.shift()!;
    try {
      await w.done;
    } finally {
      this.free!.push(w.win);
    }
  }

  /** Waits for every write in flight. */
  private async drain(): Promise<void> {
    while (this.writing.length) await this.reclaim();
  }

  /**
   * Starts writing the filling window's whole blocks (all of it, padded, when
   * `final`), and moves what is left over to the next free window, which fills
   * next; when none is free, waits for the oldest write first.
   */
  private async flip(final: boolean): Promise<void> {
    const win = this.free![0];
    const whole = final ? Math.ceil(this.held / ALIGN) * ALIGN : Math.floor(this.held / ALIGN) * ALIGN;
    if (whole === 0) return;
    const taken = Math.min(whole, this.held);
    while (this.free!.length < 2) await this.reclaim();
    const next = this.free![1];
    const rest = this.held - taken;
    if (rest > 0) win.copy(next, 0, taken, taken + rest);
    const done = this.put(win, whole, this.size - this.held, taken);
    done.catch(() => undefined); // awaited when its window is needed again, or at close
    this.free!.shift();
    this.writing.push({ win, done });
    this.held = rest;
  }

  /**
   * Leaves direct I/O for the rest of the blob: once the writes in flight are
   * done, the bytes still held go through the ordinary descriptor at their
   * place, and the windows are given back.
   */
  private async fallBack(): Promise<fsp.FileHandle> {
    await this.drain();
    const fh = await (this.buffered ??= fsp.open(this.t.tmp, "r+"));
    if (this.free && this.held > 0) await writeAll(fh, [this.free[0].subarray(0, this.held)], this.size - this.held);
    this.held = 0;
    this.done();
    return fh;
  }

  async write(data: Buffer | Buffer[]): Promise<void> {
    const parts = Array.isArray(data) ? data : [data];
    if (!this.free || this.buffered) {
      const fh = await this.fallBack();
      this.size += await writeAll(fh, parts, this.size);
      return;
    }
    for (const part of parts) {
      let pos = 0;
      while (pos < part.length) {
        const win = this.free[0];
        const n = Math.min(part.length - pos, win.length - this.held);
        part.copy(win, this.held, pos, pos + n);
        this.held += n;
        this.size += n;
        pos += n;
        if (this.held === win.length) await this.flip(false);
      }
    }
  }

  async skip(bytes: number): Promise<void> {
    if (bytes <= 0) return;
    // Direct writes go in whole aligned blocks: a hole that leaves a block half written takes zeros instead.
    if (this.free && !this.buffered && (this.held % ALIGN !== 0 || bytes % ALIGN !== 0)) return this.write(Buffer.alloc(bytes));
    if (this.free && !this.buffered) await this.flip(false);
    this.size += bytes;
  }

  async close(): Promise<number> {
    try {
      if (this.buffered) await this.fallBack();
      else if (this.free && this.held > 0) await this.flip(true);
      await this.drain();
      // The windows are free for other writers while this one is made durable.
      this.done();
      await this.t.fh.truncate(this.size);
      if (this.buffered) {
        const fh = await this.buffered;
        this.buffered = null;
        await fh.sync();
        await fh.close();
      }
      await this.t.commit();
    } catch (err) {
      await this.abort();
      throw err;
    }
    return this.size;
  }

  async abort(): Promise<void> {
    await Promise.allSettled(this.writing.map((w) => w.done));
    await this.buffered?.then((fh) => fh.close()).catch(() => undefined);
    this.buffered = null;
    this.done();
    await this.t.abort();
  }

  /** Gives the windows back (once no write uses them). */
  private done() {
    if (this.free) this.release([...this.free, ...this.writing.map((w) => w.win)]);
    this.free = null;
    this.writing = [];
  }
}

/**
 * Blobs as files under one root. Writes go to a temporary file in the target's
 * folder, are fsynced, renamed into place and the folder is fsynced, so a crash
 * leaves the old state or the whole new blob, never part of one.
 */
/** A blob's file kept open for readFixedInto; closed once dropped and no read uses it. */
interface KeptFile {
  /** The descriptor, once open. */
  fd: number | null;
  /** Its opening in the thread pool, while that runs. */
  opening: Promise<number> | null;
  users: number;
  dropped: boolean;
  /** When it was last used, on the store's count of uses. */
  used: number;
}

/** Files readFixedInto keeps open: the segments a disk's random reads and writes touch (a flush every few writes makes a small segment each). */
const KEPT_FILES = 256;

export class FsBlobStore implements BlobStore {
  private readonly keptFiles = new Map<string, KeptFile>();
  private readonly syncReads = new SyncReads();
  /** Uses of kept files so far: the least recently used is the one with the lowest mark. */
  private uses = 0;
  readonly name = "fs";
  private readonly root: string;
  /** Free aligned windows for writes that bypass the page cache (found on first use). */
  private windows: Promise<Buffer[] | null> | null = null;

  constructor(root: string) {
    this.root = path.resolve(root);
    fs.mkdirSync(this.root, { recursive: true });
  }

  /** The file of a key; every path is resolved here and must stay under the root. */
  private file(key: string): string {
    const file = path.resolve(this.root, checkKey(key));
    if (!file.startsWith(this.root + path.sep)) throw new Error(`invalid blob key "${key}"`);
    return file;
  }

  /** A temporary file beside the blob's place; `commit` makes it the blob, durably, or removes it when that fails. */
  private async openTmp(key: string, direct = false): Promise<{ fh: fsp.FileHandle; tmp: string; direct: boolean; commit(): Promise<void>; abort(): Promise<void> }> {
    const file = this.file(key);
    const dir = path.dirname(file);
    await fsp.mkdir(dir, { recursive: true });
    const tmp = path.join(dir, `.tmp-${path.basename(file)}-${crypto.randomBytes(6).toString("hex")}`);
    const { O_WRONLY, O_CREAT, O_EXCL, O_DIRECT } = fs.constants;
    let fh: fsp.FileHandle | null = null;
    if (direct && O_DIRECT) fh = await fsp.open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_DIRECT, 0o600).catch(() => null); // not every file system has it
    direct = fh !== null;
    fh ??= await fsp.open(tmp, "wx", 0o600);
    const abort = async () => {
      await fh.close().catch(() => undefined);
      await fsp.rm(tmp, { force: true });
    };
    return {
      fh,
      tmp,
      direct,
      async commit() {
        try {
          await fh.sync();
          await fh.close();
          await fsp.rename(tmp, file);
          const dh = await fsp.open(dir, "r");
          try {
            await dh.sync();
          } finally {
            await dh.close();
          }
        } catch (err) {
          await abort();
          throw err;
        }
      },
      abort,
    };
  }

  private async atomicWrite(key: string, write: (fd: fsp.FileHandle) => Promise<number>): Promise<number> {
    const t = await this.openTmp(key);
    let size: number;
    try {
      size = await write(t.fh);
    } catch (err) {
      await t.abort();
      throw err;
    }
    await t.commit();
    return size;
  }

  /** Sets up the windows of direct writes, and learns whether the file system takes them, ahead of the first one. */
  async prepare(): Promise<void> {
    await this.directWindows();
  }

  private directWindows(): Promise<Buffer[] | null> {
    return (this.windows ??= directWindows(this.root).catch(() => null));
  }

  async openWriter(key: string, opts: { bypassCache?: boolean } = {}): Promise<BlobWriter> {
    const free = opts.bypassCache ? await this.directWindows() : null;
    const wins = free && free.length >= 2 ? free.splice(-Math.min(free.length, WRITER_WINDOWS)) : null;
    let t: Awaited<ReturnType<FsBlobStore["openTmp"]>>;
    try {
      t = await this.openTmp(key, wins !== null);
    } catch (err) {
      if (wins) free!.push(...wins);
      throw err;
    }
    if (t.direct) return new DirectWriter(t, wins, (w) => free!.push(...w));
    if (wins) free!.push(...wins);
    let size = 0;
    return {
      async write(data) {
        size += await writeAll(t.fh, Array.isArray(data) ? data : [data], size);
      },
      async skip(bytes) {
        size += Math.max(0, bytes);
      },
      async close() {
        // A file that ends in a hole gets its length from here.
        await t.fh.truncate(size);
        await t.commit();
        return size;
      },
      abort: () => t.abort(),
    };
  }

  async put(key: string, data: Buffer | Buffer[]): Promise<void> {
    await this.atomicWrite(key, (fh) => writeAll(fh, Array.isArray(data) ? data : [data], 0));
  }

  async putStream(key: string, body: Readable): Promise<number> {
    return this.atomicWrite(key, async (fh) => {
      // Small stream chunks are gathered into writes of about a MiB.
      let size = 0;
      let batch: Buffer[] = [];
      let batched = 0;
      for await (const chunk of body) {
        batch.push(chunk as Buffer);
        batched += (chunk as Buffer).length;
        if (batched >= WRITE_BATCH) {
          size += await writeAll(fh, batch, size);
          batch = [];
          batched = 0;
        }
      }
      return size + (await writeAll(fh, batch, size));
    });
  }

  async get(key: string): Promise<Buffer> {
    try {
      return await fsp.readFile(this.file(key));
    } catch (err) {
      throw this.notFound(err, key);
    }
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(key, offset, buf);
    return buf;
  }

  async readInto(key: string, offset: number, buf: Buffer): Promise<void> {
    const length = buf.length;
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.file(key), "r");
    } catch (err) {
      throw this.notFound(err, key);
    }
    try {
      let done = 0;
      while (done < length) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new Error(`blob ${key} is shorter than ${offset + length} bytes`);
        done += bytesRead;
      }
    } finally {
      await fh.close();
    }
  }

  async readFixedInto(key: string, offset: number, buf: Buffer): Promise<void> {
    const sync = buf.length <= SYNC_READ_BYTES && this.syncReads.allowed();
    const file = this.kept(key, sync);
    file.users++;
    try {
      let fd = file.fd;
      if (fd === null) {
        try {
          fd = await file.opening!;
        } catch (err) {
          throw this.notFound(err, key);
        }
      }
      const open = fd;
      let done = 0;
      while (done < buf.length) {
        const at = done;
        const bytesRead = sync
          ? this.syncReads.run(() => fs.readSync(open, buf, at, buf.length - at, offset + at))
          : await new Promise<number>((resolve, reject) => fs.read(open, buf, at, buf.length - at, offset + at, (err, n) => (err ? reject(err) : resolve(n))));
        if (bytesRead === 0) throw new Error(`blob ${key} is shorter than ${offset + buf.length} bytes`);
        done += bytesRead;
      }
    } finally {
      file.users--;
      if (file.dropped && file.users === 0) this.closeKept(file);
    }
  }

  /** The kept file of a blob, opened now if it is not (`sync`: on the event loop); the least recently used beyond KEPT_FILES are closed. */
  private kept(key: string, sync: boolean): KeptFile {
    let file = this.keptFiles.get(key);
    if (file) {
      file.used = ++this.uses;
      return file;
    }
    if (sync) {
      let fd: number;
      try {
        fd = this.syncReads.run(() => fs.openSync(this.file(key), "r"));
      } catch (err) {
        throw this.notFound(err, key);
      }
      file = { fd, opening: null, users: 0, dropped: false, used: ++this.uses };
    } else {
      const opening = new Promise<number>((resolve, reject) => fs.open(this.file(key), "r", (err, fd) => (err ? reject(err) : resolve(fd))));
      const made: KeptFile = { fd: null, opening, users: 0, dropped: false, used: ++this.uses };
      // A file that failed to open is not kept.
      opening.then(
        (fd) => {
          made.fd = fd;
          made.opening = null;
        },
        () => this.drop(key, made),
      );
      file = made;
    }
    this.keptFiles.set(key, file);
    if (this.keptFiles.size > KEPT_FILES) {
      // A scan of the few kept files once per opening, rather than reordering them on every read.
      let oldest: [string, KeptFile] | null = null;
      for (const entry of this.keptFiles) if (!oldest || entry[1].used < oldest[1].used) oldest = entry;
      this.drop(...oldest!);
    }
    return file;
  }

  private drop(key: string, file: KeptFile): void {
    if (this.keptFiles.get(key) === file) this.keptFiles.delete(key);
    file.dropped = true;
    if (file.users === 0) this.closeKept(file);
  }

  private closeKept(file: KeptFile): void {
    if (file.fd !== null) fs.close(file.fd, () => undefined);
    else file.opening?.then((fd) => fs.close(fd, () => undefined)).catch(() => undefined);
  }

  closeFiles(): void {
    for (const [k, f] of [...this.keptFiles]) this.drop(k, f);
  }

  async getStream(key: string, range?: { start: number; end: number }): Promise<Readable> {
    const file = this.file(key);
    try {
      await fsp.access(file);
    } catch (err) {
      throw this.notFound(err, key);
    }
    return fs.createReadStream(file, range ? { start: range.start, end: range.end } : {});
  }

  async stat(key: string): Promise<BlobInfo | null> {
    try {
      const st = await fsp.stat(this.file(key));
      return { key, size: st.size, modifiedAt: st.mtime };
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw err;
    }
  }

  async delete(key: string): Promise<void> {
    const kept = this.keptFiles.get(key);
    if (kept) this.drop(key, kept);
    await fsp.rm(this.file(key), { force: true });
  }

  async freeBytes(): Promise<number> {
    // bavail, not bfree: the blocks reserved for root are not ours to fill.
    const st = await fsp.statfs(this.root);
    return st.bavail * st.bsize;
  }

  async *list(prefix: string): AsyncIterable<BlobInfo> {
    for await (const f of this.walk(prefix)) {
      if (!f.temporary) yield { key: f.key, size: f.size, modifiedAt: f.modifiedAt };
    }
  }

  /** Temporary files of writes that never reached their rename (the process died), untouched since `before`. */
  async removeIncomplete(prefix: string, before: Date, keep?: (key: string) => boolean): Promise<{ count: number; bytes: number }> {
    let count = 0;
    let bytes = 0;
    for await (const f of this.walk(prefix)) {
      if (!f.temporary || f.modifiedAt.getTime() >= before.getTime() || keep?.(f.key)) continue;
      await fsp.rm(f.file, { force: true });
      count++;
      bytes += f.size;
    }
    return { count, bytes };
  }

  /**
   * The files under a prefix: blobs by key, and the temporary files of writes in
   * progress or abandoned (named `.tmp-<blob name>-<random>`, matched to the
   * prefix by the name of the blob they were to become).
   */
  private async *walk(prefix: string): AsyncIterable<BlobInfo & { file: string; temporary: boolean }> {
    checkPrefix(prefix);
    // Walk the deepest folder the prefix names, then filter by the rest of it.
    const base = prefix.includes("/") ? prefix.slice(0, prefix.lastIndexOf("/")) : "";
    const start = base ? path.join(this.root, base) : this.root;
    const walk = async function* (dir: string, rel: string): AsyncIterable<BlobInfo & { file: string; temporary: boolean }> {
      let entries: fs.Dirent[];
      try {
        entries = await fsp.readdir(dir, { withFileTypes: true });
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
        throw err;
      }
      entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
      for (const e of entries) {
        const temporary = e.name.startsWith(".tmp");
        if (temporary && !e.isFile()) continue;
        // A temporary file stands for the blob it was to become: .tmp-<name>-<12 hex>.
        const name = temporary ? e.name.replace(/^\.tmp-/, "").replace(/-[0-9a-f]{12}$/, "") : e.name;
        const key = rel ? `${rel}/${name}` : name;
        if (e.isDirectory()) {
          if (key.startsWith(prefix) || prefix.startsWith(key + "/")) yield* walk(path.join(dir, e.name), key);
        } else if (e.isFile() && key.startsWith(prefix)) {
          const file = path.join(dir, e.name);
          let st: fs.Stats;
          try {
            st = await fsp.stat(file);
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code === "ENOENT") continue; // renamed or deleted meanwhile
            throw err;
          }
          yield { key, size: st.size, modifiedAt: st.mtime, file, temporary };
        }
      }
    };
    yield* walk(start, base);
  }

  private notFound(err: unknown, key: string): unknown {
    return (err as NodeJS.ErrnoException).code === "ENOENT" ? new BlobNotFoundError(key) : err;
  }
}
