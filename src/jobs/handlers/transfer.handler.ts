import crypto from "node:crypto";
import { Readable, Transform } from "node:stream";
import type { DataSource } from "typeorm";
import type { Config } from "../../config";
import { rows } from "../../db/sql";
import { JobType, type Job } from "../../entities";
import { extentsToBlocks } from "../../formats/blocks";
import { FormatError, openImage, WRITERS, type FormatName, type RandomAccessSource, type WriteSource } from "../../formats";
import type { BlobStore } from "../../storage/blob-store";
import { uploadKey } from "../../storage/uploads";
import type { Vault } from "../../storage/vault";
import { BLOCK_SIZE, sha256 } from "../../storage/volume-store";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";
import { finishImage, imageDiskBlocks, killImage, RawChecksum } from "./image.handler";

export const exportKey = (projectId: string, exportId: string) => `exports/${projectId}/${exportId}`;

const ROWS_BATCH = 512;

/** An upload in the blob store, read by ranges, counting what was read. */
export function blobSource(blobs: BlobStore, key: string, size: number, onRead?: (bytes: number) => void): RandomAccessSource {
  return {
    size,
    async read(offset, length) {
      const buf = await blobs.getRange(key, offset, length);
      onRead?.(length);
      return buf;
    },
  };
}

/**
 * Imports an uploaded file: the reader of its format turns it into the disk's
 * extents, which become 64 KiB blocks, deduplicated and packed into the vault as
 * they stream by. A malformed or hostile file ends the job with the reader's
 * reason and the image KILLED.
 */
export class ImportImageHandler implements JobHandler {
  readonly type = JobType.IMPORT_IMAGE;

  constructor(
    private readonly ds: DataSource,
    private readonly vault: Vault,
    private readonly config: Config,
  ) {}

  async run(ctx: JobContext): Promise<void> {
    const { job } = ctx;
    const { uploadId, format } = job.payload as { uploadId: string; format: FormatName };
    const [upload] = await rows<{ size_bytes: string }>(this.ds, `SELECT size_bytes FROM uploads WHERE id = $1`, [uploadId]);
    if (!upload) throw new JobFailure("UPLOAD_GONE", "the upload expired or was deleted before the import ran");
    const size = Number(upload.size_bytes);
    await this.ds.query(`UPDATE images SET status = 'SAVING', updated_at = now() WHERE id = $1`, [job.imageId]);
    let read = 0;
    const src = blobSource(this.vault.blobs, uploadKey(job.projectId, uploadId), size, (n) => (read += n));
    let reader;
    try {
      reader = await openImage(format, src, { maxVirtualSize: this.config.maxImageVirtualBytes, maxMetadataBytes: 64 * 2 ** 20 });
    } catch (err) {
      if (err instanceof FormatError) throw new JobFailure("BAD_IMAGE", `the ${format} file cannot be imported: ${err.message}`);
      throw err;
    }
    const virtualSize = reader.virtualSize;
    const [{ min_disk_bytes: minDisk, type }] = await rows<{ min_disk_bytes: string; type: string }>(this.ds, `SELECT min_disk_bytes, type FROM images WHERE id = $1`, [job.imageId]);
    const [disk] = await rows<{ id: string }>(
      this.ds,
      `INSERT INTO image_disks (image_id, disk_index, device, disk_type, size_bytes) VALUES ($1, 0, NULL, $2, $3) RETURNING id`,
      [job.imageId, type === "DATA_DISK" ? "DATA" : "SYSTEM", virtualSize],
    );
    const writer = this.vault.writer(job.projectId);
    const checksum = new RawChecksum(virtualSize);
    let batch: { index: number; hash: Buffer }[] = [];
    let chunks: { hash: Buffer; raw: Buffer }[] = [];
    const flushRows = async () => {
      await writer.addMany(chunks);
      chunks = [];
      if (!batch.length) return;
      // Rows only for chunks already indexed: flush the pack first.
      await writer.flush();
      await this.ds.query(
        `INSERT INTO image_blocks (image_disk_id, block_index, hash) SELECT $1, b.i, b.h FROM unnest($2::bigint[], $3::bytea[]) AS b(i, h)`,
        [disk.id, batch.map((b) => b.index), batch.map((b) => b.hash)],
      );
      batch = [];
    };
    try {
      for await (const block of extentsToBlocks(reader.extents(), virtualSize)) {
        checksum.add(block.index, block.data);
        if (block.data.equals(ZERO)) continue;
        const hash = sha256(block.data);
        chunks.push({ hash, raw: block.data });
        batch.push({ index: block.index, hash });
        if (chunks.length >= 64) {
          await writer.addMany(chunks);
          chunks = [];
        }
        if (batch.length >= ROWS_BATCH) await flushRows();
        await ctx.progress(read, size);
      }
      await flushRows();
    } catch (err) {
      if (err instanceof FormatError) throw new JobFailure("BAD_IMAGE", `the ${format} file is damaged or unsafe: ${err.message}`);
      throw err;
    }
    ctx.checkCancelled();
    const roundedUp = Math.ceil(virtualSize / 2 ** 20) * 2 ** 20;
    await finishImage(this.ds, job, checksum.digest(), { virtualSizeBytes: virtualSize, minDiskBytes: Math.max(Number(minDisk), roundedUp) });
    // The file has served its purpose.
    await this.ds.query(`DELETE FROM uploads WHERE id = $1`, [uploadId]);
    await this.vault.blobs.delete(uploadKey(job.projectId, uploadId));
  }

  async cleanup(job: Job, outcome: JobOutcome): Promise<void> {
    await killImage(this.ds, job, outcome);
  }
}

const ZERO = Buffer.alloc(BLOCK_SIZE);

/**
 * Writes an image to a file of the asked format, streaming from the vault
 * through the format's writer into the blob store while hashing it; the export
 * is READY once the file is durable, and expires later.
 */
export class ExportImageHandler implements JobHandler {
  readonly type = JobType.EXPORT_IMAGE;

  constructor(
    private readonly ds: DataSource,
    private readonly vault: Vault,
    private readonly config: Config,
  ) {}

  async run(ctx: JobContext): Promise<void> {
    const { job } = ctx;
    const format = (job.payload as { format: FormatName }).format;
    await this.ds.query(`UPDATE image_exports SET status = 'RUNNING' WHERE id = $1`, [job.exportId]);
    const [disk] = await rows<{ id: string; size_bytes: string }>(this.ds, `SELECT id, size_bytes FROM image_disks WHERE image_id = $1 ORDER BY disk_index LIMIT 1`, [job.imageId]);
    if (!disk) throw new JobFailure("IMAGE_GONE", "the image has no disk to export");
    const [{ n }] = await rows<{ n: string }>(this.ds, `SELECT count(*) AS n FROM image_blocks WHERE image_disk_id = $1`, [disk.id]);
    const total = Number(n) * BLOCK_SIZE;
    let done = 0;
    const { ds, vault } = this;
    const source: WriteSource = {
      virtualSize: Number(disk.size_bytes),
      async *allocated() {
        let after = -1;
        for (;;) {
          const r = await rows<{ block_index: string }>(ds, `SELECT block_index FROM image_blocks WHERE image_disk_id = $1 AND block_index > $2 ORDER BY block_index LIMIT 4096`, [disk.id, after]);
          if (!r.length) return;
          for (const x of r) yield Number(x.block_index);
          after = Number(r[r.length - 1].block_index);
        }
      },
      async *blocks() {
        for await (const b of imageDiskBlocks(ds, vault, job.projectId, disk.id)) {
          done += BLOCK_SIZE;
          await ctx.progress(done, total);
          yield b;
        }
      },
    };
    const hash = crypto.createHash("sha256");
    const hashing = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        cb(null, chunk);
      },
    });
    const file = Readable.from(WRITERS[format](source), { objectMode: false });
    file.on("error", (err) => hashing.destroy(err));
    const size = await vault.blobs.putStream(exportKey(job.projectId, job.exportId!), file.pipe(hashing));
    ctx.checkCancelled();
    await this.ds.query(
      `UPDATE image_exports SET status = 'READY', size_bytes = $2, sha256 = $3, expires_at = now() + make_interval(secs => $4) WHERE id = $1`,
      [job.exportId, size, hash.digest("hex"), this.config.exportTtlSeconds],
    );
  }

  async cleanup(job: Job, _outcome: JobOutcome): Promise<void> {
    await this.ds.query(`UPDATE image_exports SET status = 'FAILED' WHERE id = $1`, [job.exportId]);
    if (job.exportId) await this.vault.blobs.delete(exportKey(job.projectId, job.exportId)).catch(() => undefined);
  }
}

