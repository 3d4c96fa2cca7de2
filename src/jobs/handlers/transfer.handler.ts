import type { DataSource } from "typeorm";
import type { Config } from "../../config";
import { hashAt, list, listOf, packedHashes, rows } from "../../db/sql";
import { FailureCode, type JobOf } from "../../domain/jobs";
import * as exportStatus from "../../domain/status/export";
import * as imageStatus from "../../domain/status/image";
import { JobType } from "../../entities";
import { FormatError, isHole, openImage, WRITERS, type RandomAccessSource, type WriteSource } from "../../formats";
import { groupBlocks, type BlockGroup } from "../../formats/blocks";
import { mapOrdered } from "../../storage/pipeline";
import type { BlobStore } from "../../storage/blob-store";
import { exportKey, mappedRanges, uploadKey } from "../../storage/uploads";
import { hex, type Vault } from "../../storage/vault";
import { BLOCK_SIZE } from "../../storage/volume-store";
import type { JobContext, JobHandler, JobOutcome } from "../runner";
import { JobFailure } from "../runner";
import { sealPending } from "../copy-blocks";
import { imageDiskBlocks, killImage } from "./image.handler";
import { ContentChecksum } from "../../formats/checksum";

const ROWS_BATCH = 512;
/** Bytes of an export file written at a time. */
const EXPORT_PIECE = 4 * 1024 * 1024;

/** An upload in the blob store, read by ranges, counting what was read; its data map, when known, tells where its holes are. */
export function blobSource(blobs: BlobStore, key: string, size: number, onRead?: (bytes: number) => void, dataMap?: Buffer | null): RandomAccessSource {
  return {
    size,
    ...(dataMap && {
      async *dataRanges(offset: number, length: number) {
        yield* mappedRanges(dataMap, size, offset, length);
      },
    }),
    async read(offset, length) {
      const buf = await blobs.getRange(key, offset, length);
      onRead?.(length);
      return buf;
    },
    async readInto(offset, into) {
      await blobs.readInto(key, offset, into);
      onRead?.(into.length);
    },
  };
}

/**
 * Imports an uploaded file: the reader of its format turns it into the disk's
 * extents, which become 64 KiB blocks, deduplicated and packed into the vault as
 * they stream by. A malformed or hostile file ends the job with the reader's
 * reason and the image KILLED.
 */
export class ImportImageHandler implements JobHandler<JobType.IMPORT_IMAGE> {
  readonly type = JobType.IMPORT_IMAGE;

  constructor(
    private readonly ds: DataSource,
    private readonly vault: Vault,
    private readonly config: Config,
  ) {}

  async run(ctx: JobContext<JobType.IMPORT_IMAGE>): Promise<void> {
    const { job } = ctx;
    const { uploadId, format } = job.payload;
    const [upload] = await rows<{ size_bytes: string; data_map: Buffer | null; data_bytes: string | null }>(this.ds, `SELECT size_bytes, data_map, data_bytes FROM uploads WHERE id = $1`, [uploadId]);
    if (!upload) throw new JobFailure(FailureCode.UPLOAD_GONE, "the upload expired or was deleted before the import ran");
    const size = Number(upload.size_bytes);
    // The work is the file's data: its runs of zeros are holes, never read.
    const dataBytes = upload.data_bytes === null ? size : Number(upload.data_bytes);
    await imageStatus.markSaving(this.ds, job.imageId);
    let read = 0;
    const src = blobSource(this.vault.blobs, uploadKey(job.projectId, uploadId), size, (n) => (read += n), upload.data_map);
    await ctx.progress(0, dataBytes);
    let reader;
    try {
      // Readers check sizes against what a 64-bit offset can hold; this service's own limit is a limit, not damage.
      reader = await openImage(format, src, { maxVirtualSize: Math.max(this.config.maxImageVirtualBytes, 2 ** 50), maxMetadataBytes: 64 * 2 ** 20 });
    } catch (err) {
      if (err instanceof FormatError) throw new JobFailure(FailureCode.BAD_IMAGE, `the ${format} file cannot be imported: ${err.message}`);
      throw err;
    }
    const virtualSize = reader.virtualSize;
    if (virtualSize > this.config.maxImageVirtualBytes) {
      throw new JobFailure(FailureCode.TOO_LARGE, `the file describes a ${virtualSize}-byte disk, larger than this service takes (MAX_IMAGE_VIRTUAL_BYTES, ${this.config.maxImageVirtualBytes} bytes)`);
    }
    const [{ min_disk_bytes: minDisk, type }] = await rows<{ min_disk_bytes: string; type: string }>(this.ds, `SELECT min_disk_bytes, type FROM images WHERE id = $1`, [job.imageId]);
    const [disk] = await rows<{ id: string }>(this.ds, `INSERT INTO image_disks (image_id, disk_index, device, disk_type, size_bytes) VALUES ($1, 0, NULL, $2, $3) RETURNING id`, [
      job.imageId,
      type === "DATA_DISK" ? "DATA" : "SYSTEM",
      virtualSize,
    ]);
    const { codec } = this.vault;
    const writer = this.vault.writer(job.projectId);
    const checksum = new ContentChecksum();
    let pending: { index: number; hash: Buffer }[] = [];
    const insertRows = async () => {
      if (!pending.length) return;
      // A row may name a chunk whose pack is still being written; the image turns ACTIVE only once all are indexed.
      await this.ds.query(`INSERT INTO image_blocks (image_disk_id, block_index, hash) SELECT $1, b.i, ${hashAt("$3", "b.n")} FROM unnest(${listOf("$2", "bigint")}) WITH ORDINALITY AS b(i, n)`, [
        disk.id,
        list(pending.map((b) => b.index)),
        packedHashes(pending.map((b) => b.hash)),
      ]);
      pending = [];
    };
    // Blocks in groups of 64: hashed on the codec's workers a few groups ahead, then
    // added to the image's checksum, looked up in the vault, and the new ones packed.
    const hashed = async (g: BlockGroup) => ({ g, ...(await codec.hash(g.data, BLOCK_SIZE)) });
    try {
      for await (const { g, data, hashes } of mapOrdered(
        groupBlocks(reader.extents(), virtualSize, (n) => codec.buffers.take(n)),
        4,
        hashed,
      )) {
        ctx.checkCancelled();
        ctx.visit(g.indexes.length);
        checksum.addMany(g.indexes, hashes);
        const slots = hashes.flatMap((hash, slot) => (hash ? [{ hash, slot }] : []));
        const have = await this.vault.existing(
          job.projectId,
          slots.map((b) => b.hash),
        );
        for (const b of slots) pending.push({ index: g.indexes[b.slot], hash: b.hash });
        const fresh = slots.filter((b) => !have.has(hex(b.hash)));
        await writer.addBlocks(data, fresh);
        if (pending.length >= ROWS_BATCH) await insertRows();
        await ctx.progress(read, dataBytes);
      }
      await writer.flush();
      await insertRows();
    } catch (err) {
      await writer.abort();
      if (err instanceof FormatError) throw new JobFailure(FailureCode.BAD_IMAGE, `the ${format} file is damaged or unsafe: ${err.message}`);
      throw err;
    }
    const missing = await sealPending(this.ds, { table: "image_blocks", ownerColumn: "image_disk_id", ownerIds: [disk.id], projectId: job.projectId });
    if (missing > 0) throw new JobFailure(FailureCode.INCOMPLETE, `${missing} blocks have no chunk in the vault`);
    ctx.checkCancelled();
    const roundedUp = Math.ceil(virtualSize / 2 ** 20) * 2 ** 20;
    await ctx.commit((em) => imageStatus.markActive(em, job.imageId, checksum.hex(virtualSize), { virtualSizeBytes: virtualSize, minDiskBytes: Math.max(Number(minDisk), roundedUp) }));
    // The file has served its purpose.
    await this.ds.query(`DELETE FROM uploads WHERE id = $1`, [uploadId]);
    await this.vault.blobs.delete(uploadKey(job.projectId, uploadId));
  }

  async cleanup(job: JobOf<JobType.IMPORT_IMAGE>, outcome: JobOutcome): Promise<void> {
    await killImage(this.ds, job, outcome);
  }
}

/**
 * Writes an image to a file of the asked format, streaming from the vault
 * through the format's writer into the blob store while hashing it; the export
 * is READY once the file is durable, and expires later.
 */
export class ExportImageHandler implements JobHandler<JobType.EXPORT_IMAGE> {
  readonly type = JobType.EXPORT_IMAGE;

  constructor(
    private readonly ds: DataSource,
    private readonly vault: Vault,
    private readonly config: Config,
  ) {}

  async run(ctx: JobContext<JobType.EXPORT_IMAGE>): Promise<void> {
    const { job } = ctx;
    const { format } = job.payload;
    await exportStatus.markRunning(this.ds, job.exportId);
    const [disk] = await rows<{ id: string; size_bytes: string }>(this.ds, `SELECT id, size_bytes FROM image_disks WHERE image_id = $1 ORDER BY disk_index LIMIT 1`, [job.imageId]);
    if (!disk) throw new JobFailure(FailureCode.IMAGE_GONE, "the image has no disk to export");
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
          ctx.visit(r.length);
          for (const x of r) yield Number(x.block_index);
          after = Number(r[r.length - 1].block_index);
        }
      },
      async *blocks() {
        for await (const b of imageDiskBlocks(ds, vault, job.projectId, disk.id)) {
          done += BLOCK_SIZE;
          ctx.visit(1);
          await ctx.progress(done, total);
          yield b;
        }
      },
    };
    // The file goes to its blob in pieces of a few MiB, and its holes as holes: a RAW
    // export of a 1 TiB disk holding 8 MiB is a sparse file that costs 8 MiB. The
    // SHA-256 of the other formats' files is computed on a codec worker meanwhile; a
    // RAW file's would cost hashing every zero of the disk, so it is left null (the
    // image's checksum verifies it). An export is written once and downloaded once,
    // so it skips the OS cache where the store can.
    const digest = format === "RAW" ? null : vault.codec.digest();
    const out = await vault.blobs.openWriter(exportKey(job.projectId, job.exportId), { bypassCache: true });
    let size = 0;
    try {
      let held: Buffer[] = [];
      let heldBytes = 0;
      const put = async () => {
        if (!held.length) return;
        await digest?.update(held);
        await out.write(held);
        held = [];
        heldBytes = 0;
      };
      for await (const piece of WRITERS[format](source)) {
        if (isHole(piece)) {
          await put();
          await digest?.update(null, piece.hole);
          await out.skip(piece.hole);
          continue;
        }
        // Pieces are lent: held ones are copied once they add up.
        held.push(Buffer.from(piece));
        heldBytes += piece.length;
        if (heldBytes >= EXPORT_PIECE) await put();
      }
      await put();
      size = await out.close();
    } catch (err) {
      await out.abort();
      await digest?.abandon();
      throw err;
    }
    const sha256 = digest ? (await digest.digest()).toString("hex") : null;
    ctx.checkCancelled();
    await ctx.commit((em) => exportStatus.markReady(em, job.exportId, { sizeBytes: size, sha256 }, this.config.exportTtlSeconds));
  }

  async cleanup(job: JobOf<JobType.EXPORT_IMAGE>, outcome: JobOutcome): Promise<void> {
    await exportStatus.markFailed(this.ds, job.exportId, outcome.code, outcome.message);
    if (job.exportId) await this.vault.blobs.delete(exportKey(job.projectId, job.exportId)).catch(() => undefined);
  }
}
