import { captureSourceSql, detachClones } from "../storage/clones";
import type { EntityManager } from "typeorm";
import { rows } from "../db/sql";
import {
  Backup,
  BackupResourceType,
  BackupStatus,
  Disk,
  DiskFormat,
  DiskStatus,
  DiskType,
  ExportStatus,
  Image,
  ImageExport,
  ImageSource,
  ImageStatus,
  ImageType,
  JobType,
  OsType,
  Server,
  type Job,
} from "../entities";
import type { Readable } from "node:stream";
import { BlobNotFoundError } from "../storage/blob-store";
import { addImageDisksFromBackup } from "../storage/manifest";
import { exportKey, UploadTooLarge, type UploadStore } from "../storage/uploads";
import { BLOCK_SIZE } from "../storage/volume-store";
import type { CreateImagePayload } from "../domain/jobs";
import type { BackupService } from "./backup.service";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badBody, badInput, BodyFault, conflict, DomainError, ErrorCode, failedPrecondition, notFound } from "../domain/errors";
import { decodeId, fromGlobalId } from "./global-id";
import type { JobQueue } from "./job-queue";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs, type ListSelection } from "./pagination";
import { derivedName, description as validDescription, resourceName } from "./validate";

export interface ImageFilter {
  statuses?: ImageStatus[] | null;
  types?: ImageType[] | null;
  sources?: ImageSource[] | null;
  osTypes?: OsType[] | null;
  name?: string | null;
}

export interface ImageExportFilter {
  statuses?: ExportStatus[] | null;
  formats?: DiskFormat[] | null;
}

export interface CreateImageInput {
  name: string;
  type?: ImageType | null;
  serverId?: string | null;
  diskId?: string | null;
  backupId?: string | null;
  description?: string | null;
  osType?: OsType | null;
}

export interface ImportImageInput {
  name: string;
  type?: ImageType | null;
  uploadId: string;
  format?: DiskFormat | null;
  osType?: OsType | null;
  minDiskBytes?: number | null;
  description?: string | null;
}

export function imageConditions(filter: ImageFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter.types?.length) out.push({ sql: "t.type = ANY($1)", params: [filter.types] });
  if (filter.sources?.length) out.push({ sql: "t.source = ANY($1)", params: [filter.sources] });
  if (filter.osTypes?.length) out.push({ sql: "t.os_type = ANY($1)", params: [filter.osTypes] });
  if (filter.name) out.push({ sql: "t.name ILIKE $1", params: [likeSubstring(filter.name)] });
  return out;
}

export function exportConditions(filter: ImageExportFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (filter?.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter?.formats?.length) out.push({ sql: "t.format = ANY($1)", params: [filter.formats] });
  return out;
}

/** Images can be exported to files unless they hold a whole server (IMS). */
export const isExportable = (image: Image) => image.type !== ImageType.FULL_SERVER && image.status === ImageStatus.ACTIVE;

const typeOfDisk = (t: DiskType | null) => (t === DiskType.SYSTEM ? ImageType.SYSTEM_DISK : ImageType.DATA_DISK);
const ONE_PER_BACKUP = { uq_images_full_server_backup: "a FULL_SERVER image of this backup already exists; one per backup" };

/**
 * The image rules (IMS): SYSTEM_DISK and DATA_DISK images of a disk at one
 * instant, FULL_SERVER images of a server backup (one per backup, taking the
 * backup first when asked from a server), import from and export to files, and
 * no export of FULL_SERVER images.
 */
export class ImageService {
  constructor(
    private readonly queue: JobQueue,
    private readonly backups: BackupService,
    private readonly uploads?: UploadStore,
  ) {}

  list(ctx: RequestContext, list: ListName & `${string}mages`, key: string, args: PageArgs & { filter?: ImageFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection(list, key, args, imageConditions(args.filter), select);
  }

  exports(ctx: RequestContext, imageId: string, args: PageArgs & { filter?: ImageExportFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection("imageExports", imageId, args, exportConditions(args.filter), select);
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Image> {
    const image = await ctx.loaders.image.load(decodeId(globalId, "Image", field));
    if (!image) throw notFound("image", globalId);
    return image;
  }

  async create(ctx: RequestContext, input: CreateImageInput): Promise<{ image: Image; job: Job }> {
    const name = resourceName(input.name, "name");
    const desc = validDescription(input.description, "description");
    const given = [input.serverId && "serverId", input.diskId && "diskId", input.backupId && "backupId"].filter(Boolean);
    if (given.length !== 1) throw badInput(given.length ? String(given[1]) : "serverId", "give exactly one of serverId, diskId or backupId");

    // A FULL_SERVER image of a server: back the server up first, then make the image of that backup.
    if (input.serverId && input.type === ImageType.FULL_SERVER) {
      const { backup } = await this.backups.create(ctx, { resourceId: input.serverId, name: derivedName(name, "-backup"), description: `taken for image ${name}` });
      return this.fromBackup(ctx, { ...input, name, description: desc, backupId: null }, backup.id, true);
    }
    if (input.backupId) return this.fromBackup(ctx, { ...input, name, description: desc }, decodeId(input.backupId, "Backup", "backupId"), false);

    const result = await ctx.ds.transaction(async (em) => {
      let disk: Disk | null;
      let server: Server | null = null;
      if (input.serverId) {
        server = await em.findOne(Server, { where: { id: decodeId(input.serverId, "Server", "serverId"), projectId: ctx.projectId } });
        if (!server) throw notFound("server", input.serverId);
        if (input.type && input.type !== ImageType.SYSTEM_DISK) throw badInput("type", "a server makes a SYSTEM_DISK or FULL_SERVER image");
        disk = await em.findOne(Disk, { where: { serverId: server.id, type: DiskType.SYSTEM }, lock: { mode: "pessimistic_write" } });
        if (!disk) throw failedPrecondition("the server has no system disk");
      } else {
        disk = await em.findOne(Disk, { where: { id: decodeId(input.diskId!, "Disk", "diskId"), projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        if (!disk) throw notFound("disk", input.diskId!);
        if (input.type && input.type !== typeOfDisk(disk.type)) throw badInput("type", `a ${disk.type} disk makes a ${typeOfDisk(disk.type)} image`);
        if (disk.serverId) server = await em.findOne(Server, { where: { id: disk.serverId } });
      }
      if (disk.status === DiskStatus.RESTORING || disk.status === DiskStatus.CREATING || disk.status === DiskStatus.ERROR) {
        throw conflict(`disk ${disk.name} is ${disk.status}`);
      }
      const image = await em.save(
        em.create(Image, {
          projectId: ctx.projectId,
          name,
          description: desc,
          type: typeOfDisk(disk.type),
          status: ImageStatus.QUEUED,
          source: input.serverId ? ImageSource.SERVER : ImageSource.DISK,
          sourceServerId: server?.id ?? null,
          sourceDiskId: disk.id,
          sourceBackupId: null,
          osType: input.osType ?? server?.osType ?? OsType.OTHER,
          minDiskBytes: disk.sizeBytes,
          virtualSizeBytes: disk.sizeBytes,
          sizeBytes: 0,
          checksum: null,
          errorCode: null,
          errorMessage: null,
        }),
      );
      // The disk at this instant: its written blocks, still pointing at their volume segments.
      const [imageDisk] = await rows<{ id: string }>(em, `INSERT INTO image_disks (image_id, disk_index, device, disk_type, size_bytes) VALUES ($1, 0, $2, $3, $4) RETURNING id`, [
        image.id,
        disk.device,
        disk.type,
        disk.sizeBytes,
      ]);
      await em.query(
        `INSERT INTO image_blocks (image_disk_id, block_index, hash, src_segment, src_offset)
         SELECT $1, block_index, hash, segment_id, segment_offset FROM disk_blocks WHERE disk_id = $2 AND hash IS NOT NULL`,
        [imageDisk.id, disk.id],
      );
      // A clone's blocks still read from its source are named by their chunks, which the vault holds already.
      await em.query(captureSourceSql("image_blocks", "image_disk_id", `SELECT $1::uuid AS owner, $2::uuid AS disk_id`), [imageDisk.id, disk.id]);
      const payload: CreateImagePayload = { sourceDiskId: disk.id };
      const job = await this.queue.add(em, ctx.projectId, { type: JobType.CREATE_IMAGE, imageId: image.id, diskId: disk.id, serverId: server?.id ?? null, payload: { ...payload } });
      return { image, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  private async fromBackup(ctx: RequestContext, input: CreateImageInput & { name: string; description: string }, backupId: string, takenNow: boolean): Promise<{ image: Image; job: Job }> {
    const result = await ctx.ds
      .transaction(async (em) => {
        const backup = await em.findOne(Backup, { where: { id: backupId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        if (!backup) throw notFound("backup", input.backupId ?? undefined);
        if (backup.parentId) throw badInput("backupId", "this disk backup is part of a server backup; use the server backup");
        if (!takenNow && backup.status !== BackupStatus.AVAILABLE) throw failedPrecondition(`only AVAILABLE backups make images; this one is ${backup.status}`);
        const isServer = backup.resourceType === BackupResourceType.SERVER;
        const type = isServer ? ImageType.FULL_SERVER : typeOfDisk(backup.diskType);
        if (input.type && input.type !== type) throw badInput("type", `this backup makes a ${type} image`);
        const server = backup.serverId ? await em.findOne(Server, { where: { id: backup.serverId } }) : null;
        const parts = isServer ? await em.find(Backup, { where: { parentId: backup.id }, order: { device: "ASC" } }) : [backup];
        const system = parts.find((p) => p.diskType === DiskType.SYSTEM) ?? parts[0];
        const image = await em.save(
          em.create(Image, {
            projectId: ctx.projectId,
            name: input.name,
            description: input.description,
            type,
            status: ImageStatus.QUEUED,
            source: takenNow ? ImageSource.SERVER : ImageSource.BACKUP,
            sourceServerId: backup.serverId && server ? backup.serverId : null,
            sourceDiskId: !isServer && backup.diskId ? backup.diskId : null,
            sourceBackupId: backup.id,
            osType: input.osType ?? server?.osType ?? OsType.OTHER,
            minDiskBytes: system?.diskSizeBytes ?? 0,
            virtualSizeBytes: system?.diskSizeBytes ?? 0,
            sizeBytes: 0,
            checksum: null,
            errorCode: null,
            errorMessage: null,
          }),
        );
        const payload: CreateImagePayload = takenNow ? { awaitBackupId: backup.id } : {};
        if (!takenNow) await addImageDisksFromBackup(em, image.id, parts);
        const job = await this.queue.add(em, ctx.projectId, { type: JobType.CREATE_IMAGE, imageId: image.id, backupId: backup.id, serverId: backup.serverId, payload: { ...payload } });
        return { image, job };
      })
      .catch((err) => {
        throw translateDbError(err, ONE_PER_BACKUP);
      });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /** importImage: an uploaded file becomes an image; the job reads and checks it. */
  async import(ctx: RequestContext, input: ImportImageInput): Promise<{ image: Image; job: Job }> {
    const name = resourceName(input.name, "name");
    const desc = validDescription(input.description, "description");
    const type = input.type ?? ImageType.SYSTEM_DISK;
    if (type === ImageType.FULL_SERVER) throw badInput("type", "FULL_SERVER images are made from server backups, not imported");
    if (!/^[0-9a-f-]{36}$/.test(input.uploadId)) throw badInput("uploadId", "not an upload ID from POST /v1/uploads");
    const [upload] = await rows<{ id: string; size_bytes: string; data_bytes: string | null }>(
      ctx.ds,
      `SELECT id, size_bytes, data_bytes FROM uploads WHERE id = $1 AND project_id = $2 AND expires_at > now()`,
      [input.uploadId, ctx.projectId],
    );
    if (!upload) throw notFound("upload", input.uploadId);
    if (input.minDiskBytes != null && (!Number.isSafeInteger(input.minDiskBytes) || input.minDiskBytes < 0)) throw badInput("minDiskBytes", "must be a byte count");
    let format: DiskFormat;
    try {
      if (!this.uploads) throw new Error("imports need the upload store");
      format = (await this.uploads.detect(ctx.projectId, upload.id)) as DiskFormat;
    } catch (err) {
      if (err instanceof Error && err.name === "FormatError") throw badInput("uploadId", err.message);
      throw err;
    }
    if (input.format && input.format !== format) throw badInput("format", `the file is ${format}, not ${input.format}`);
    const result = await ctx.ds.transaction(async (em) => {
      const image = await em.save(
        em.create(Image, {
          projectId: ctx.projectId,
          name,
          description: desc,
          type,
          status: ImageStatus.QUEUED,
          source: ImageSource.IMPORT,
          sourceServerId: null,
          sourceDiskId: null,
          sourceBackupId: null,
          osType: input.osType ?? OsType.OTHER,
          minDiskBytes: input.minDiskBytes ?? 0,
          virtualSizeBytes: 0,
          sizeBytes: 0,
          checksum: null,
          errorCode: null,
          errorMessage: null,
        }),
      );
      const job = await this.queue.add(em, ctx.projectId, {
        type: JobType.IMPORT_IMAGE,
        imageId: image.id,
        bytesTotal: Number(upload.data_bytes ?? upload.size_bytes),
        payload: { uploadId: upload.id, format },
      });
      return { image, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  async export(ctx: RequestContext, input: { imageId: string; format: DiskFormat }): Promise<{ export: ImageExport; job: Job }> {
    const imageId = decodeId(input.imageId, "Image", "imageId");
    if (!Object.values(DiskFormat).includes(input.format)) throw badInput("format", "one of RAW, QCOW2, VMDK, VHD");
    const result = await ctx.ds.transaction(async (em) => {
      const image = await em.findOne(Image, { where: { id: imageId, projectId: ctx.projectId }, lock: { mode: "pessimistic_read" } });
      if (!image) throw notFound("image", input.imageId);
      if (image.type === ImageType.FULL_SERVER) throw failedPrecondition("FULL_SERVER images cannot be exported; export an image of one disk");
      if (image.status !== ImageStatus.ACTIVE) throw failedPrecondition(`only ACTIVE images can be exported; this one is ${image.status}`);
      const exp = await em.save(
        em.create(ImageExport, {
          projectId: ctx.projectId,
          imageId,
          format: input.format,
          status: ExportStatus.QUEUED,
          sizeBytes: null,
          sha256: null,
          jobId: null,
          errorCode: null,
          errorMessage: null,
          expiresAt: null,
        }),
      );
      const job = await this.queue.add(em, ctx.projectId, { type: JobType.EXPORT_IMAGE, imageId, exportId: exp.id, payload: { format: input.format } });
      exp.jobId = job.id;
      await em.save(exp);
      return { export: exp, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /** Deletes an image and its export files; servers and disks made from it stay, and so do backups it was made from. */
  async delete(ctx: RequestContext, globalId: string): Promise<Image> {
    const id = decodeId(globalId, "Image", "id");
    const { image, exports } = await ctx.ds.transaction(async (em) => {
      const img = await em.findOne(Image, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!img) throw notFound("image", globalId);
      if (img.status === ImageStatus.QUEUED || img.status === ImageStatus.SAVING) throw conflict("the image is being created; cancel its job first");
      const building = await em.count(Disk, { where: { sourceImageId: id, status: DiskStatus.CREATING } });
      if (building) throw conflict("disks are being created from this image; delete it when they are ready");
      const exports = await em.find(ImageExport, { where: { imageId: id }, lock: { mode: "pessimistic_write" } });
      if (exports.some((e) => e.status === ExportStatus.QUEUED || e.status === ExportStatus.RUNNING)) throw conflict("the image is being exported; cancel the export job first");
      // Disks made from it (clones) read from its block list from now on, kept as it is.
      const parts = await rows<{ id: string }>(em, `SELECT id FROM image_disks WHERE image_id = $1`, [id]);
      await detachClones(em, { imageDiskIds: parts.map((p) => p.id) });
      await em.delete(Image, { id }); // its exports' rows go with it (ON DELETE CASCADE)
      return { image: img, exports };
    });
    for (const e of exports) await this.deleteExportFile(e);
    ctx.invalidate();
    return image;
  }

  /** deleteImageExport: the export's row and its file, now. One being written is CONFLICT: its job must be cancelled first. */
  async deleteExport(ctx: RequestContext, globalId: string): Promise<ImageExport> {
    const id = decodeId(globalId, "ImageExport", "id");
    const exp = await ctx.ds.transaction(async (em) => {
      const e = await em.findOne(ImageExport, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!e) throw notFound("image export", globalId);
      if (e.status === ExportStatus.QUEUED || e.status === ExportStatus.RUNNING) throw conflict(`the export is ${e.status}; cancel its job first`);
      await em.delete(ImageExport, { id });
      return e;
    });
    await this.deleteExportFile(exp);
    ctx.invalidate();
    return exp;
  }

  /**
   * Removes an export's file once its row is gone (in that order: a crash in
   * between leaves a file without a row, which garbage collection removes, never
   * a READY export without its file). An expired export's file is gone already.
   */
  private async deleteExportFile(exp: ImageExport): Promise<void> {
    if (exp.status === ExportStatus.EXPIRED) return;
    await this.uploads?.blobs.delete(exportKey(exp.projectId, exp.id));
  }

  /** Takes an image file into the caller's uploads, refusing it past UPLOAD_MAX_BYTES or empty; what importImage names by its id. */
  async upload(ctx: RequestContext, body: Readable): Promise<{ id: string; sizeBytes: number; sha256: string }> {
    let upload: { id: string; sizeBytes: number; sha256: string };
    try {
      upload = await this.store().put(ctx.projectId, body, ctx.config.uploadMaxBytes, ctx.config.uploadTtlSeconds);
    } catch (err) {
      if (err instanceof UploadTooLarge) throw badBody(err.message, BodyFault.TOO_LARGE);
      throw err;
    }
    if (upload.sizeBytes === 0) throw badBody("the file is empty");
    return upload;
  }

  /** The caller's READY export named by `globalId`, with its image's name; NOT_FOUND for an ID naming none of the caller's exports. */
  async readyExport(ctx: RequestContext, globalId: string): Promise<{ export: ImageExport; imageName: string | null }> {
    const parsed = fromGlobalId(globalId);
    const exp = parsed?.type === "ImageExport" ? await ctx.ds.getRepository(ImageExport).findOneBy({ id: parsed.id, projectId: ctx.projectId }) : null;
    if (!exp) throw new DomainError(ErrorCode.NOT_FOUND, "no such export");
    if (exp.status !== ExportStatus.READY) throw failedPrecondition(`the export is ${exp.status}`);
    const image = await ctx.ds.getRepository(Image).findOneBy({ id: exp.imageId, projectId: ctx.projectId });
    return { export: exp, imageName: image?.name ?? null };
  }

  /** A READY export's file, or the bytes of `range`; NOT_FOUND once the file has expired. */
  async exportFile(exp: ImageExport, range?: { start: number; end: number }): Promise<Readable> {
    try {
      return await this.store().blobs.getStream(exportKey(exp.projectId, exp.id), range);
    } catch (err) {
      if (err instanceof BlobNotFoundError) throw new DomainError(ErrorCode.NOT_FOUND, "the export's file is gone (expired)");
      throw err;
    }
  }

  /**
   * Where a READY export's data lies, as qemu-img map --output=json says it: extents
   * covering the file, each `data` or a hole of zeros. A RAW file's come from the
   * image's block list, so they cost what the data costs; other formats are one data extent.
   */
  async exportExtents(ctx: RequestContext, exp: ImageExport): Promise<{ start: number; length: number; data: boolean; zero: boolean }[]> {
    const size = exp.sizeBytes ?? 0;
    const extents: { start: number; length: number; data: boolean; zero: boolean }[] = [];
    const add = (start: number, end: number, data: boolean) => {
      if (end > start) extents.push({ start, length: end - start, data, zero: !data });
    };
    if (exp.format !== DiskFormat.RAW) {
      add(0, size, true);
      return extents;
    }
    const runs = await rows<{ first: string; last: string }>(
      ctx.ds,
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
    return extents;
  }

  private store(): UploadStore {
    if (!this.uploads) throw new Error("the services were made without storage");
    return this.uploads;
  }

  /** The image disks a new server or disk is built from, checked against what the caller asks. */
  async imageDisks(
    em: EntityManager,
    ctx: RequestContext,
    globalId: string,
    field: string,
  ): Promise<{ image: Image; disks: { id: string; device: string | null; diskType: DiskType; sizeBytes: number }[] }> {
    const image = await em.findOne(Image, { where: { id: decodeId(globalId, "Image", field), projectId: ctx.projectId } });
    if (!image) throw notFound("image", globalId);
    if (image.status !== ImageStatus.ACTIVE) throw failedPrecondition(`image ${image.name} is ${image.status}; only ACTIVE images make servers and disks`);
    const disks = await rows<{ id: string; device: string | null; disk_type: DiskType; size_bytes: string }>(
      em,
      `SELECT id, device, disk_type, size_bytes FROM image_disks WHERE image_id = $1 ORDER BY disk_index`,
      [image.id],
    );
    return { image, disks: disks.map((d) => ({ id: d.id, device: d.device, diskType: d.disk_type, sizeBytes: Number(d.size_bytes) })) };
  }
}
