import { pipeline } from "node:stream/promises";
import express, { type NextFunction, type Request, type RequestHandler, type Response } from "express";
import type { Project } from "../entities";
import { EXTENSIONS, type FormatName } from "../formats";
import type { Services } from "../services";
import type { RequestContext } from "../services/context";
import { badBody, BodyFault, DomainError } from "../domain/errors";
import type { FreeSpace } from "../storage/free-space";
import { BLOCK_SIZE, type BlockWrite, type VolumeStore } from "../storage/volume-store";
import { sendError } from "./errors";

export interface DataRouteDeps {
  services: Services;
  volumes: VolumeStore;
  space: FreeSpace;
  authenticate: RequestHandler;
  /** The request context of the caller's project, as GraphQL's resolvers get it. */
  context(project: Project): RequestContext;
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
async function* toBlocks(body: AsyncIterable<Buffer>, start: number, length: number, readBlock: (index: number) => Promise<Buffer>): AsyncIterable<BlockWrite> {
  const end = start + length;
  let pos = start;
  let block: Buffer | null = null;
  let index = -1;
  for await (const chunk of body) {
    let off = 0;
    while (off < chunk.length) {
      if (pos >= end) throw badBody("the body is longer than its Content-Length or Content-Range");
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
  if (pos !== end) throw badBody(`the body ended after ${pos - start} of ${length} bytes`);
}

/** The client went away in the middle of its request: there is no one left to answer. */
const clientGone = (err: unknown) => (err as NodeJS.ErrnoException).code === "ECONNRESET" || (err as Error).message === "aborted";

/**
 * Bytes beside GraphQL: disk data, image uploads, export files. The rules (which
 * disk or export the caller may reach, in what status) are the services'; the
 * routes read headers, stream bytes and answer every refusal through `sendError`.
 */
export function dataRoutes(deps: DataRouteDeps): express.Router {
  const router = express.Router();
  const { disks, images } = deps.services;

  /** Answers a refusal; what is not a domain error goes to the error handler. */
  const refuse = (res: Response, next: NextFunction, err: unknown) => {
    if (err instanceof DomainError && !res.headersSent) sendError(res, err);
    else if (res.headersSent) res.destroy(err as Error);
    else next(err);
  };

  router.put("/v1/disks/:id/data", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const ctx = deps.context(req.project!);
      const disk = await disks.forData(ctx, String(req.params.id));
      const declared = req.headers["content-length"];
      if (declared === undefined) throw badBody("Content-Length is required", BodyFault.LENGTH_REQUIRED);
      const length = Number(declared);
      let start = 0;
      if (req.headers["content-range"]) {
        const range = parseContentRange(req.headers["content-range"]);
        if (!range) throw badBody("Content-Range must be bytes START-END/* with END >= START");
        if (range.end - range.start + 1 !== length) throw badBody("Content-Range and Content-Length disagree");
        start = range.start;
      }
      if (start + length > disk.sizeBytes) {
        return sendError(res, badBody(`the write ends at byte ${start + length}, past the end of the ${disk.sizeBytes}-byte disk`, BodyFault.RANGE_NOT_SATISFIABLE), {
          "Content-Range": `bytes */${disk.sizeBytes}`,
        });
      }
      await disks.assertWritable(ctx, disk.id);
      await deps.space.check();
      if (length === 0) return void res.status(200).json({ bytesWritten: 0 });

      await deps.volumes.withDiskLock(disk.id, async () => {
        // A restore may have begun while this write waited for the lock.
        await disks.assertWritable(ctx, disk.id);
        await deps.volumes.putBlocks(
          disk.projectId,
          disk.id,
          toBlocks(req, start, length, (i) => deps.volumes.readBlock(disk.id, i)),
        );
      });
      res.status(200).json({ bytesWritten: length });
    } catch (err) {
      if (clientGone(err)) return;
      refuse(res, next, err);
    }
  });

  router.get("/v1/disks/:id/data", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const disk = await disks.forData(deps.context(req.project!), String(req.params.id));
      let start = 0;
      let end = disk.sizeBytes - 1;
      res.setHeader("Accept-Ranges", "bytes");
      if (req.headers.range) {
        const range = parseRange(req.headers.range, disk.sizeBytes);
        if (range === "unsatisfiable") return sendError(res, badBody("the range is outside the disk", BodyFault.RANGE_NOT_SATISFIABLE), { "Content-Range": `bytes */${disk.sizeBytes}` });
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
      refuse(res, next, err);
    }
  });

  router.post("/v1/uploads", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const ctx = deps.context(req.project!);
      const declared = req.headers["content-length"];
      const max = ctx.config.uploadMaxBytes;
      if (declared !== undefined && Number(declared) > max) throw badBody(`the file is larger than the ${max}-byte upload limit`, BodyFault.TOO_LARGE);
      await deps.space.check();
      res.status(201).json(await images.upload(ctx, req));
    } catch (err) {
      if (clientGone(err)) return;
      refuse(res, next, err);
    }
  });

  router.get("/v1/exports/:id/file", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const { export: exp, imageName } = await images.readyExport(deps.context(req.project!), String(req.params.id));
      const size = exp.sizeBytes ?? 0;
      const filename = `${(imageName ?? "image").replace(/[^A-Za-z0-9._-]/g, "_")}.${EXTENSIONS[exp.format as FormatName]}`;
      res.setHeader("Accept-Ranges", "bytes");
      res.setHeader("Content-Type", "application/octet-stream");
      res.setHeader("Content-Disposition", `attachment; filename="${filename}"`);
      if (exp.sha256) res.setHeader("ETag", `"${exp.sha256}"`);
      // A RAW file is mostly holes: its map says where the data is, so a client fetches only that.
      if (exp.format === "RAW") res.setHeader("Link", `</v1/exports/${String(req.params.id)}/map>; rel="describedby"; type="application/json"`);
      let range: { start: number; end: number } | undefined;
      if (req.headers.range) {
        const r = parseRange(req.headers.range, size);
        if (r === "unsatisfiable") return sendError(res, badBody("the range is outside the file", BodyFault.RANGE_NOT_SATISFIABLE), { "Content-Range": `bytes */${size}` });
        if (r) {
          range = r;
          res.status(206).setHeader("Content-Range", `bytes ${r.start}-${r.end}/${size}`);
        }
      }
      res.setHeader("Content-Length", String(range ? range.end - range.start + 1 : size));
      const stream = await images.exportFile(exp, range);
      await pipeline(stream, res);
    } catch (err) {
      refuse(res, next, err);
    }
  });

  /** Where a RAW export's data lies (qemu-img map --output=json); other formats are one data extent. */
  router.get("/v1/exports/:id/map", deps.authenticate, async (req: Request, res: Response, next: NextFunction) => {
    try {
      const ctx = deps.context(req.project!);
      const { export: exp } = await images.readyExport(ctx, String(req.params.id));
      res.json(await images.exportExtents(ctx, exp));
    } catch (err) {
      refuse(res, next, err);
    }
  });

  return router;
}
