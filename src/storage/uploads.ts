import crypto from "node:crypto";
import { Transform, type Readable } from "node:stream";
import type { DataSource } from "typeorm";
import { rows } from "../db/sql";
import { detectFormat, type FormatName } from "../formats";
import type { BlobStore } from "./blob-store";

export const uploadKey = (projectId: string, uploadId: string) => `uploads/${projectId}/${uploadId}`;
/** An exported image file; exports live beside the uploads. */
export const exportKey = (projectId: string, exportId: string) => `exports/${projectId}/${exportId}`;

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

  async put(projectId: string, body: Readable, maxBytes: number, ttlSeconds: number): Promise<{ id: string; sizeBytes: number; sha256: string }> {
    const id = crypto.randomUUID();
    const hash = crypto.createHash("sha256");
    let size = 0;
    const counting = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        size += chunk.length;
        if (size > maxBytes) return cb(new UploadTooLarge(maxBytes));
        hash.update(chunk);
        cb(null, chunk);
      },
    });
    body.on("error", (err) => counting.destroy(err));
    await this.blobs.putStream(uploadKey(projectId, id), body.pipe(counting));
    const sha256 = hash.digest("hex");
    await this.ds.query(`INSERT INTO uploads (id, project_id, size_bytes, sha256, expires_at) VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))`, [
      id,
      projectId,
      size,
      sha256,
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
