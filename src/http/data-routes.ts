import { pipeline } from "node:stream/promises";
import express, { type NextFunction, type Request, type RequestHandler, type Response } from "express";
import type { DataSource } from "typeorm";
import { rows } from "../db/sql";
import { Disk, DiskStatus } from "../entities";
import { httpStatusOf } from "../graphql/errors";
import { DomainError } from "../domain/errors";
import { fromGlobalId } from "../services/global-id";
import type { FreeSpace } from "../storage/free-space";
import { BLOCK_SIZE, type BlockWrite, type VolumeStore } from "../storage/volume-store";
import { exportKey, UploadTooLarge, type UploadStore } from "../storage/uploads";
import { ImageExport, Image } from "../entities";
import { EXTENSIONS, type FormatName } from "../formats";
import { BlobNotFoundError } from "../storage/blob-store";

export interface DataRouteDeps {
  ds: DataSource;
  volumes: VolumeStore;
  uploads: UploadStore;
  uploadMaxBytes: number;
  uploadTtlSeconds: number;
  space: FreeSpace;
  authenticate: RequestHandler;
}

function fail(res: Response, status: number, code: string, message: string, headers: Record<string, string> = {}) {
  for (const [k, v] of Object.entries(headers)) res.setHeader(k, v);
  // The body of a refused write or upload is not read; close the connection rather than drain it.
  if (status >= 400 && (res.req.method === "PUT" || res.req.method === "POST") && !res.req.complete) res.setHeader("Connection", "close");
  res.status(status).json({ error: { code, message } });
}

/** False, having answered 507 NO_SPACE, when the storage is below its free-space floor. */
async function roomToWrite(space: FreeSpace, res: Response): Promise<boolean> {
  try {
    await space.check();
    return true;
  } catch (err) {
    if (!(err instanceof DomainError)) throw err;
    fail(res, httpStatusOf(err.code), err.code, err.message);
    return false;
  }
}

/** `bytes S-E/*` or `bytes S-E/N` of a PUT. */
function parseContentRange(header: string): { start: number; end: number } | null {
  const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header.trim());
  if (!m) return null;
  const start = Number(m[1]);
  const end = Number(m[2]);
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || end < start) return null;
  return { start, end };
}

/** Writes `piece` to the response: resolves once it is written (its memory may be reused), rejects if the client goes away first. */
function sent(res: Response, piece: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const gone = () => reject(new Error("aborted"));
    res.once("close", gone);
    res.write(piece, (err) => {
      res.off("close", gone);
      if (err) reject(err);
      else resolve();
    });
  });
}

/** A single `bytes=` range of a GET, resolved against the disk size; "unsatisfiable" when outside it. */
function parseRange(header: string, size: number): { start: number; end: number } | "unsatisfiable" | null {
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === "" && m[2] === "")) return null;
  if (m[1] === "") {
    const n = Number(m[2]);
    if (n === 0) return "unsatisfiable";
    return { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(m[1]);
  const end = m[2] === "" ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size || end < start) return "unsatisfiable";
  return { start, end };
}

/**
 * Cuts a byte stream landing at [start, start + length) into whole disk blocks.
 * A block the write covers only in part is first read, so its other bytes stay.
 */
export async function* toBlocks(body: AsyncIterable<Buffer>, start: number, length: number, readBlock: (index: number) => Promise<Buffer>): AsyncIterable<BlockWrite> {
  const end = start + length;
  let pos = start;
  let block: Buffer | null = null;
  let index = -1;
  for await (const chunk of body) {
    let off = 0;
    while (off < chunk.length) {
      if (pos >= end) throw new BodyError("the body is longer than its Content-Length or Content-Range");
      const inBlock = pos % BLOCK_SIZE;
      if (!block) {
        index = Math.floor(pos / BLOCK_SIZE);
        block = inBlock !== 0 || end - pos < BLOCK_SIZE ? await readBlock(index) : Buffer.allocUnsafe(BLOCK_SIZE);
      }
      const n = Math.min(BLOCK_SIZE - inBlock, chunk.length - off, end - pos);
      chunk.copy(block, inBlock, off, off + n);
      off += n;
      pos += n;
      if (pos % BLOCK_SIZE === 0 || pos === end) {
        yield { index, data: block };
        block = null;
      }
    }
  }
  if (pos !== end) throw new BodyError(`the body ended after ${pos - start} of ${length} bytes`);
}

class BodyError extends Error {}

/** Bytes beside GraphQL: disk data, image uploads, export files. */
export function dataRoutes(deps: DataRouteDeps): express.Router {
  const router = express.Router();

  const loadDisk = async (req: Request, res: Response): Promise<Disk | null> => {
    const parsed = fromGlobalId(String(req.params.id));
    const disk = parsed?.type === "Disk" ? await deps.ds.getRepository(Disk).findOneBy({ id: parsed.id, projectId: req.project!.id }) : null;
    if (!disk) fail(res, 404, "NOT_FOUND", "no such disk");
    return disk;
  };

  router.put("/v1/disks/:id/data", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const disk = await loadDisk(req, res);
      if (!disk) return;
      const declared = req.headers["content-length"];
      if (declared === undefined) return fail(res, 411, "BAD_USER_INPUT", "Content-Length is required");
      const length = Number(declared);
      let start = 0;
      if (req.headers["content-range"]) {
        const range = parseContentRange(req.headers["content-range"]);
        if (!range) return fail(res, 400, "BAD_USER_INPUT", "Content-Range must be bytes START-END/* with END >= START");
        if (range.end - range.start + 1 !== length) return fail(res, 400, "BAD_USER_INPUT", "Content-Range and Content-Length disagree");
        start = range.start;
      }
      if (start + length > disk.sizeBytes) {
        return fail(res, 416, "BAD_USER_INPUT", `the write ends at byte ${start + length}, past the end of the ${disk.sizeBytes}-byte disk`, { "Content-Range": `bytes */${disk.sizeBytes}` });
      }
      if (disk.status === DiskStatus.RESTORING || disk.status === DiskStatus.CREATING) return fail(res, 409, "CONFLICT", `the disk is ${disk.status}`);
      if (!(await roomToWrite(deps.space, res))) return;
      if (length === 0) return void res.status(200).json({ bytesWritten: 0 });

      await deps.volumes.withDiskLock(disk.id, async () => {
        const current = await deps.ds.getRepository(Disk).findOneByOrFail({ id: disk.id });
        if (current.status === DiskStatus.RESTORING || current.status === DiskStatus.CREATING) throw new BusyError(`the disk is ${current.status}`);
        await deps.volumes.putBlocks(
          disk.projectId,
          disk.id,
          toBlocks(req, start, length, (i) => deps.volumes.readBlock(disk.id, i)),
        );
      });
      res.status(200).json({ bytesWritten: length });
    } catch (err) {
      if (err instanceof BodyError) return fail(res, 400, "BAD_USER_INPUT", err.message);
      if (err instanceof BusyError) return fail(res, 409, "CONFLICT", err.message);
      if ((err as NodeJS.ErrnoException).code === "ECONNRESET" || (err as Error).message === "aborted") return; // the client went away
      next(err);
    }
  });

  router.get("/v1/disks/:id/data", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const disk = await loadDisk(req, res);
      if (!disk) return;
      let start = 0;
      let end = disk.sizeBytes - 1;
      res.setHeader("Accept-Ranges", "bytes");
      if (req.headers.range) {
        const range = parseRange(req.headers.range, disk.sizeBytes);
        if (range === "unsatisfiable") return fail(res, 416, "BAD_USER_INPUT", "the range is outside the disk", { "Content-Range": `bytes */${disk.sizeBytes}` });
        if (range) {
          ({ start, end } = range);
          res.status(206).setHeader("Content-Range", `bytes ${start}-${end}/${disk.sizeBytes}`);
        }
      }
      res.setHeader("Content-Type", "application/octet-stream");
      res.setHeader("Content-Length", String(end - start + 1));
      await deps.volumes.readTo(disk.id, start, end, (piece) => sent(res, piece));
      res.end();
    } catch (err) {
      if (res.headersSent) {
        res.destroy(err as Error);
        return;
      }
      next(err);
    }
  });

  router.post("/v1/uploads", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const declared = req.headers["content-length"];
      if (declared !== undefined && Number(declared) > deps.uploadMaxBytes) {
        return fail(res, 413, "BAD_USER_INPUT", `the file is larger than the ${deps.uploadMaxBytes}-byte upload limit`);
      }
      if (!(await roomToWrite(deps.space, res))) return;
      const upload = await deps.uploads.put(req.project!.id, req, deps.uploadMaxBytes, deps.uploadTtlSeconds);
      if (upload.sizeBytes === 0) return fail(res, 400, "BAD_USER_INPUT", "the file is empty");
      res.status(201).json(upload);
    } catch (err) {
      if (err instanceof UploadTooLarge) return fail(res, 413, "BAD_USER_INPUT", err.message);
      if ((err as NodeJS.ErrnoException).code === "ECONNRESET" || (err as Error).message === "aborted") return;
      next(err);
    }
  });

  /** The caller's READY export named in the path, or null having answered why not. */
  const readyExport = async (req: Request, res: Response): Promise<ImageExport | null> => {
    const parsed = fromGlobalId(String(req.params.id));
    const exp = parsed?.type === "ImageExport" ? await deps.ds.getRepository(ImageExport).findOneBy({ id: parsed.id, projectId: req.project!.id }) : null;
    if (!exp) fail(res, 404, "NOT_FOUND", "no such export");
    else if (exp.status !== "READY") fail(res, 409, "FAILED_PRECONDITION", `the export is ${exp.status}`);
    return exp?.status === "READY" ? exp : null;
  };

  router.get("/v1/exports/:id/file", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const exp = await readyExport(req, res);
      if (!exp) return;
      const size = exp.sizeBytes ?? 0;
      const image = await deps.ds.getRepository(Image).findOneBy({ id: exp.imageId });
      const filename = `${(image?.name ?? "image").replace(/[^A-Za-z0-9._-]/g, "_")}.${EXTENSIONS[exp.format as FormatName]}`;
      res.setHeader("Accept-Ranges", "bytes");
      res.setHeader("Content-Type", "application/octet-stream");
      res.setHeader("Content-Disposition", `attachment; filename="${filename}"`);
      if (exp.sha256) res.setHeader("ETag", `"${exp.sha256}"`);
      // A RAW file is mostly holes: its map says where the data is, so a client fetches only that.
      if (exp.format === "RAW") res.setHeader("Link", `</v1/exports/${String(req.params.id)}/map>; rel="describedby"; type="application/json"`);
      let range: { start: number; end: number } | undefined;
      if (req.headers.range) {
        const r = parseRange(req.headers.range, size);
        if (r === "unsatisfiable") return fail(res, 416, "BAD_USER_INPUT", "the range is outside the file", { "Content-Range": `bytes */${size}` });
        if (r) {
          range = r;
          res.status(206).setHeader("Content-Range", `bytes ${r.start}-${r.end}/${size}`);
        }
      }
      res.setHeader("Content-Length", String(range ? range.end - range.start + 1 : size));
      const stream = await deps.uploads.blobs.getStream(exportKey(exp.projectId, exp.id), range);
      await pipeline(stream, res);
    } catch (err) {
      if (err instanceof BlobNotFoundError && !res.headersSent) return fail(res, 404, "NOT_FOUND", "the export's file is gone (expired)");
      if (res.headersSent) {
        res.destroy(err as Error);
        return;
      }
      next(err);
    }
  });

  /**
   * Where a RAW export's data lies, as qemu-img map --output=json says it: extents
   * covering the file, each `data` or a hole of zeros. Computed from the image's
   * block list, so it costs what the data costs. Other formats are one data extent.
   */
  router.get("/v1/exports/:id/map", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const exp = await readyExport(req, res);
      if (!exp) return;
      const size = exp.sizeBytes ?? 0;
      const extents: { start: number; length: number; data: boolean; zero: boolean }[] = [];
      const add = (start: number, end: number, data: boolean) => {
        if (end > start) extents.push({ start, length: end - start, data, zero: !data });
      };
      if (exp.format !== "RAW") add(0, size, true);
      else {
        const runs = await rows<{ first: string; last: string }>(
          deps.ds,
          `SELECT min(block_index) AS first, max(block_index) AS last FROM (
             SELECT ib.block_index, ib.block_index - row_number() OVER (ORDER BY ib.block_index) AS run
               FROM image_blocks ib JOIN image_disks d ON d.id = ib.image_disk_id WHERE d.image_id = $1 AND d.disk_index = 0
           ) AS t GROUP BY run ORDER BY 1`,
          [exp.imageId],
        );
        let at = 0;
        for (const r of runs) {
          const start = Math.min(size, Number(r.first) * BLOCK_SIZE);
          const end = Math.min(size, (Number(r.last) + 1) * BLOCK_SIZE);
          add(at, start, false);
          add(start, end, true);
          at = end;
        }
        add(at, size, false);
      }
      res.json(extents);
    } catch (err) {
      next(err);
    }
  });

  return router;
}

class BusyError extends Error {}
