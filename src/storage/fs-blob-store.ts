import crypto from "node:crypto";
import fs from "node:fs";
import fsp from "node:fs/promises";
import path from "node:path";
import type { Readable } from "node:stream";
import { BlobNotFoundError, checkKey, checkPrefix, type BlobInfo, type BlobStore } from "./blob-store";

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

/**
 * Blobs as files under one root. Writes go to a temporary file in the target's
 * folder, are fsynced, renamed into place and the folder is fsynced, so a crash
 * leaves the old state or the whole new blob, never part of one.
 */
export class FsBlobStore implements BlobStore {
  readonly name = "fs";
  private readonly root: string;

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

  private async atomicWrite(key: string, write: (fd: fsp.FileHandle) => Promise<number>): Promise<number> {
    const file = this.file(key);
    const dir = path.dirname(file);
    await fsp.mkdir(dir, { recursive: true });
    const tmp = path.join(dir, `.tmp-${path.basename(file)}-${crypto.randomBytes(6).toString("hex")}`);
    const fh = await fsp.open(tmp, "wx", 0o600);
    let size: number;
    try {
      size = await write(fh);
      await fh.sync();
    } catch (err) {
      await fh.close().catch(() => undefined);
      await fsp.rm(tmp, { force: true });
      throw err;
    }
    await fh.close();
    await fsp.rename(tmp, file);
    const dh = await fsp.open(dir, "r");
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
    return size;
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
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(this.file(key), "r");
    } catch (err) {
      throw this.notFound(err, key);
    }
    try {
      const buf = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) throw new Error(`blob ${key} is shorter than ${offset + length} bytes`);
        done += bytesRead;
      }
      return buf;
    } finally {
      await fh.close();
    }
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
    await fsp.rm(this.file(key), { force: true });
  }

  async *list(prefix: string): AsyncIterable<BlobInfo> {
    for await (const f of this.walk(prefix)) {
      if (!f.temporary) yield { key: f.key, size: f.size, modifiedAt: f.modifiedAt };
    }
  }

  /** Temporary files of writes that never reached their rename (the process died), untouched since `before`. */
  async removeIncomplete(prefix: string, before: Date): Promise<{ count: number; bytes: number }> {
    let count = 0;
    let bytes = 0;
    for await (const f of this.walk(prefix)) {
      if (!f.temporary || f.modifiedAt.getTime() >= before.getTime()) continue;
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

