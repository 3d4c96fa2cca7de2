import crypto from "node:crypto";
import { Writable, type Readable } from "node:stream";
import { finished } from "node:stream/promises";
import type { DataSource } from "typeorm";
import { rows } from "../db/sql";
import { BLOCK_SIZE, detectFormat, isZeros, type FormatName } from "../formats";
import type { BlobStore } from "./blob-store";

export const uploadKey = (projectId: string, uploadId: string) => `uploads/${projectId}/${uploadId}`;
/** An exported image file; exports live beside the uploads. */
export const exportKey = (projectId: string, exportId: string) => `exports/${projectId}/${exportId}`;

/** Bytes gathered before their blocks are checked for zeros and written. */
const STAGING = 16 * BLOCK_SIZE;

/** A bitmap of an upload's 64 KiB blocks that hold data, grown as the file streams in. */
export class DataMap {
  private bits = Buffer.alloc(1024);
  count = 0;

  set(index: number): void {
    const byte = index >> 3;
    if (byte >= this.bits.length) {
      const grown = Buffer.alloc(Math.max(byte + 1, this.bits.length * 2));
      this.bits.copy(grown);
      this.bits = grown;
    }
    this.bits[byte] |= 1 << (index & 7);
    this.count++;
  }

  /** The bitmap of a file of `size` bytes. */
  bytes(size: number): Buffer {
    const out = Buffer.alloc(Math.ceil(Math.ceil(size / BLOCK_SIZE) / 8));
    this.bits.copy(out, 0, 0, Math.min(out.length, this.bits.length));
    return out;
  }
}

/**
 * The runs of blocks that hold data, from an upload's bitmap, as byte ranges
 * within [offset, offset + length) of a file of `size` bytes.
 */
export function* mappedRanges(map: Buffer, size: number, offset: number, length: number): Iterable<{ offset: number; length: number }> {
  const end = Math.min(size, offset + length);
  let index = Math.floor(offset / BLOCK_SIZE);
  const last = Math.ceil(end / BLOCK_SIZE);
  const has = (i: number) => (map[i >> 3] & (1 << (i & 7))) !== 0;
  while (index < last) {
    // Whole bytes of the bitmap without data are passed over at once.
    if ((index & 7) === 0 && map[index >> 3] === 0) {
      index += 8;
      continue;
    }
    if (!has(index)) {
      index++;
      continue;
    }
    let stop = index + 1;
    while (stop < last && has(stop)) stop++;
    const from = Math.max(offset, index * BLOCK_SIZE);
    const to = Math.min(end, stop * BLOCK_SIZE);
    if (to > from) yield { offset: from, length: to - from };
    index = stop;
  }
}

export class UploadTooLarge extends Error {
  constructor(readonly limit: number) {
    super(`the upload is larger than the ${limit}-byte limit`);
  }
}

/** Image files waiting to be imported: streamed in, hashed on the way, kept until imported or expired. */
export class UploadStore {
  constructor(
    private readonly ds: DataSource,
    readonly blobs: BlobStore,
  ) {}

  /**
   * Streams an image file in, hashing it on the way. Its all-zero 64 KiB blocks
   * become holes in the blob (a sparse file where the store has them) and are
   * left out of the upload's data map, so a 10 GiB file holding 300 MiB costs
   * 300 MiB of disk, and its import reads only those.
   */
  async put(projectId: string, body: Readable, maxBytes: number, ttlSeconds: number): Promise<{ id: string; sizeBytes: number; sha256: string }> {
    const id = crypto.randomUUID();
    const hash = crypto.createHash("sha256");
    const key = uploadKey(projectId, id);
    // Past the page cache where the store can: the file is made durable as it streams
    // in, so the answer does not wait at the end for all of it to be flushed.
    const writer = await this.blobs.openWriter(key, { bypassCache: true });
    const map = new DataMap();
    // Bytes gather in a buffer on the 64 KiB grid, a MiB at a time.
    const staging = Buffer.allocUnsafe(STAGING);
    let held = 0;
    let size = 0;
    const drain = async (final: boolean) => {
      const whole = final ? held : held - (held % BLOCK_SIZE);
      // Runs of data blocks go out in one write, runs of zero blocks as one hole.
      let pos = 0;
      while (pos < whole) {
        const zero = isZeros(staging.subarray(pos, Math.min(whole, pos + BLOCK_SIZE)));
        let end = pos;
        while (end < whole && isZeros(staging.subarray(end, Math.min(whole, end + BLOCK_SIZE))) === zero) {
          if (!zero) map.set((size - held + end) / BLOCK_SIZE);
          end = Math.min(whole, end + BLOCK_SIZE);
        }
        if (zero) await writer.skip(end - pos);
        else await writer.write(staging.subarray(pos, end));
        pos = end;
      }
      staging.copy(staging, 0, whole, held);
      held -= whole;
    };
    const take = async (chunk: Buffer) => {
      if (size + chunk.length > maxBytes) throw new UploadTooLarge(maxBytes);
      hash.update(chunk);
      for (let pos = 0; pos < chunk.length;) {
        const n = Math.min(chunk.length - pos, STAGING - held);
        chunk.copy(staging, held, pos, pos + n);
        held += n;
        size += n;
        pos += n;
        if (held === STAGING) await drain(false);
      }
    };
    // Piped rather than iterated: a refused body is left unread, not destroyed, so the
    // answer (413) still reaches the client on its connection.
    const sink = new Writable({
      write: (chunk: Buffer, _enc, cb) => void take(chunk).then(() => cb(), cb),
      final: (cb) => void drain(true).then(() => cb(), cb),
    });
    body.on("error", (err) => sink.destroy(err));
    try {
      body.pipe(sink);
      await finished(sink);
      await writer.close();
    } catch (err) {
      await writer.abort();
      throw err;
    }
    const sha256 = hash.digest("hex");
    await this.ds.query(`INSERT INTO uploads (id, project_id, size_bytes, sha256, data_map, data_bytes, expires_at) VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))`, [
      id,
      projectId,
      size,
      sha256,
      map.bytes(size),
      Math.min(size, map.count * BLOCK_SIZE),
      ttlSeconds,
    ]);
    return { id, sizeBytes: size, sha256 };
  }

  /** The format of an upload, from its own bytes. */
  async detect(projectId: string, uploadId: string): Promise<FormatName> {
    const [u] = await rows<{ size_bytes: string }>(this.ds, `SELECT size_bytes FROM uploads WHERE id = $1 AND project_id = $2`, [uploadId, projectId]);
    if (!u) throw new Error("no such upload");
    const key = uploadKey(projectId, uploadId);
    return detectFormat({ size: Number(u.size_bytes), read: (offset, length) => this.blobs.getRange(key, offset, length) });
  }

  /** Deletes expired uploads. */
  async expire(): Promise<number> {
    const gone = await rows<{ id: string; project_id: string }>(this.ds, `DELETE FROM uploads WHERE expires_at < now() RETURNING id, project_id`);
    for (const u of gone) await this.blobs.delete(uploadKey(u.project_id, u.id));
    return gone.length;
  }
}
