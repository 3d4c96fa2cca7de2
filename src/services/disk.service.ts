import { Disk, DiskStatus, DiskType, ImageType, JobType, Server, ServerStatus, type Job } from "../entities";
import { hydrationOf, imageDataBytes, runningHydration } from "../storage/clones";
import * as diskStatus from "../domain/status/disk";
import type { BackupService } from "./backup.service";
import type { ImageService } from "./image.service";
import type { JobQueue } from "./job-queue";
import type { NbdService } from "./nbd.service";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badInput, conflict, DomainError, ErrorCode, failedPrecondition, notFound } from "../domain/errors";
import { decodeId, fromGlobalId } from "./global-id";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs, type ListSelection } from "./pagination";
import { DEVICES } from "./server.service";
import { diskSize, MiB, resourceName } from "./validate";

export interface DiskFilter {
  statuses?: DiskStatus[] | null;
  types?: DiskType[] | null;
  name?: string | null;
  serverId?: string | null;
  attached?: boolean | null;
  imageId?: string | null;
  backupId?: string | null;
}

export interface CreateDiskInput {
  name: string;
  sizeBytes?: number | null;
  imageId?: string | null;
  backupId?: string | null;
  /** Copy the source's blocks into the disk's own storage in the background. */
  hydrate?: boolean | null;
}

export interface AttachDiskInput {
  diskId: string;
  serverId: string;
  device?: string | null;
}

export function diskConditions(filter: DiskFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter.types?.length) out.push({ sql: "t.type = ANY($1)", params: [filter.types] });
  if (filter.name) out.push({ sql: "t.name ILIKE $1", params: [likeSubstring(filter.name)] });
  if (filter.serverId) out.push({ sql: "t.server_id = $1", params: [decodeId(filter.serverId, "Server", "filter.serverId")] });
  if (filter.attached != null) out.push({ sql: filter.attached ? "t.server_id IS NOT NULL" : "t.server_id IS NULL", params: [] });
  if (filter.imageId) out.push({ sql: "t.source_image_id = $1", params: [decodeId(filter.imageId, "Image", "filter.imageId")] });
  if (filter.backupId) out.push({ sql: "t.source_backup_id = $1", params: [decodeId(filter.backupId, "Backup", "filter.backupId")] });
  return out;
}

const DEVICE_IN_USE = { uq_disks_server_device: "that device is already in use on the server" };

export class DiskService {
  constructor(
    private readonly backups: BackupService,
    private readonly images: ImageService,
    private readonly queue: JobQueue,
    private readonly nbd: NbdService,
  ) {}

  list(ctx: RequestContext, list: ListName & `${string}isks`, key: string, args: PageArgs & { filter?: DiskFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection(list, key, args, diskConditions(args.filter), select);
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Disk> {
    const disk = await ctx.loaders.disk.load(decodeId(globalId, "Disk", field));
    if (!disk) throw notFound("disk", globalId);
    return disk;
  }

  /** The caller's disk whose bytes the data endpoint reads or writes; an ID that names none of the caller's disks is NOT_FOUND. */
  async forData(ctx: RequestContext, globalId: string): Promise<Disk> {
    const parsed = fromGlobalId(globalId);
    const disk = parsed?.type === "Disk" ? await ctx.ds.getRepository(Disk).findOneBy({ id: parsed.id, projectId: ctx.projectId }) : null;
    if (!disk) throw new DomainError(ErrorCode.NOT_FOUND, "no such disk");
    return disk;
  }

  /** Refuses a write to the disk's bytes while a job creates or restores it (those bytes are the job's); read fresh, under the disk's lock. */
  async assertWritable(ctx: RequestContext, diskId: string): Promise<void> {
    const disk = await ctx.ds.getRepository(Disk).findOneBy({ id: diskId, projectId: ctx.projectId });
    if (!disk) throw new DomainError(ErrorCode.NOT_FOUND, "no such disk");
    if (disk.status === DiskStatus.RESTORING || disk.status === DiskStatus.CREATING) throw conflict(`the disk is ${disk.status}`);
  }

  async create(ctx: RequestContext, input: CreateDiskInput): Promise<{ disk: Disk; job: Job | null }> {
    const name = resourceName(input.name, "name");
    if (input.imageId && input.backupId) throw badInput("backupId", "give imageId or backupId, not both");
    if (input.imageId) return this.fromImage(ctx, name, input.imageId, input.sizeBytes ?? null, Boolean(input.hydrate));
    if (input.backupId) return this.backups.createDisk(ctx, { name, sizeBytes: input.sizeBytes, backupId: input.backupId, hydrate: input.hydrate }, ctx.config.maxDiskBytes);
    if (input.sizeBytes == null) throw badInput("sizeBytes", "is required for a blank disk");
    const sizeBytes = diskSize(input.sizeBytes, "sizeBytes", ctx.config.maxDiskBytes);
    const repo = ctx.ds.getRepository(Disk);
    const disk = await repo.save(
      repo.create({
        projectId: ctx.projectId,
        name,
        type: DiskType.DATA,
        sizeBytes,
        usedBytes: 0,
        status: DiskStatus.AVAILABLE,
        serverId: null,
        device: null,
        sourceImageId: null,
        sourceBackupId: null,
      }),
    );
    ctx.invalidate();
    return { disk, job: null };
  }

  /**
   * A data disk reading as a DATA_DISK image, at least the image's minimum size, at once: a
   * clone whose blocks come from the image in the vault until written (with `hydrate`, a job
   * copies them into the disk's own storage in the background).
   */
  private async fromImage(ctx: RequestContext, name: string, imageGlobalId: string, sizeBytes: number | null, hydrate: boolean): Promise<{ disk: Disk; job: Job | null }> {
    const result = await ctx.ds.transaction(async (em) => {
      const { image, disks } = await this.images.imageDisks(em, ctx, imageGlobalId, "imageId");
      if (image.type !== ImageType.DATA_DISK) throw badInput("imageId", `a ${image.type} image makes servers; disks are made from DATA_DISK images`);
      const minimum = Math.ceil(Math.max(disks[0].sizeBytes, image.minDiskBytes) / MiB) * MiB;
      const size = sizeBytes == null ? minimum : diskSize(sizeBytes, "sizeBytes", ctx.config.maxDiskBytes);
      if (size < minimum) throw badInput("sizeBytes", `must be at least the image's ${minimum} bytes`);
      const [used] = await imageDataBytes(em, [disks[0].id]);
      const disk = await em.save(
        em.create(Disk, {
          projectId: ctx.projectId,
          name,
          type: DiskType.DATA,
          sizeBytes: size,
          usedBytes: used,
          status: DiskStatus.AVAILABLE,
          serverId: null,
          device: null,
          sourceImageId: image.id,
          sourceBackupId: null,
          cloneImageId: image.id,
          cloneImageDiskId: disks[0].id,
        }),
      );
      const job = hydrate ? await this.queue.add(em, ctx.projectId, { type: JobType.CREATE_DISK, diskId: disk.id, imageId: image.id, payload: { hydrate: [disk.id] } }) : null;
      return { disk, job };
    });
    if (result.job) await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /** Where a disk's data lives (Disk.hydration). */
  hydration(ctx: RequestContext, diskId: string): Promise<{ bytesInVault: number; bytesLocal: number }> {
    return hydrationOf(ctx.ds, diskId);
  }

  /** hydrateDisk: copies the blocks a clone still reads from its source into its own storage, as a job; the disk stays in use. */
  async hydrate(ctx: RequestContext, globalId: string): Promise<{ disk: Disk; job: Job }> {
    const id = decodeId(globalId, "Disk", "id");
    const result = await ctx.ds.transaction(async (em) => {
      const disk = await em.findOne(Disk, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!disk) throw notFound("disk", globalId);
      if (!disk.cloneBackupId && !disk.cloneImageDiskId && !disk.cloneManifestId) throw failedPrecondition("every block of the disk is in its own storage already");
      if (await runningHydration(em, ctx.projectId, [disk.id])) throw conflict("the disk is being hydrated already");
      const job = await this.queue.add(em, ctx.projectId, { type: JobType.CREATE_DISK, diskId: disk.id, payload: { hydrate: [disk.id] } });
      return { disk, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /** Attaches a data disk; without `device`, the first free one after /dev/vda. */
  async attach(ctx: RequestContext, input: AttachDiskInput): Promise<{ disk: Disk; server: Server }> {
    const diskId = decodeId(input.diskId, "Disk", "diskId");
    const serverId = decodeId(input.serverId, "Server", "serverId");
    if (input.device != null && !DEVICES.slice(1).includes(input.device)) {
      throw badInput("device", "must be one of /dev/vdb to /dev/vdz (/dev/vda is the system disk)");
    }
    const result = await ctx.ds
      .transaction(async (em) => {
        // Lock the server before the disk, in the same order as deleteServer, so the two never deadlock.
        const server = await em.findOne(Server, { where: { id: serverId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        if (!server) throw notFound("server", input.serverId);
        const disk = await em.findOne(Disk, { where: { id: diskId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        if (!disk) throw notFound("disk", input.diskId);
        if (disk.serverId) {
          throw failedPrecondition(disk.serverId === server.id ? `disk is already attached to this server as ${disk.device}` : "disk is attached to another server; detach it first");
        }
        if (disk.type === DiskType.SYSTEM) throw failedPrecondition("a system disk cannot be attached as a data disk");
        if (disk.status !== DiskStatus.AVAILABLE) throw failedPrecondition(`disk is ${disk.status}; only an AVAILABLE disk can be attached`);
        if (server.status !== ServerStatus.ACTIVE && server.status !== ServerStatus.SHUTOFF) {
          throw failedPrecondition(`server is ${server.status}; disks can be attached to ACTIVE or SHUTOFF servers`);
        }
        const used = new Set((await em.find(Disk, { where: { serverId: server.id }, select: { device: true } })).map((d) => d.device));
        const device = input.device ?? DEVICES.slice(1).find((d) => !used.has(d));
        if (!device) throw failedPrecondition("server has no free device name left");
        if (used.has(device)) throw conflict(`${device} is already in use on the server`);
        return { disk: await diskStatus.attach(em, disk, server.id, device), server };
      })
      .catch((err) => {
        throw translateDbError(err, DEVICE_IN_USE);
      });
    ctx.invalidate();
    return result;
  }

  async detach(ctx: RequestContext, input: { diskId: string; serverId?: string | null }): Promise<{ disk: Disk; server: Server }> {
    const diskId = decodeId(input.diskId, "Disk", "diskId");
    const expectedServer = input.serverId ? decodeId(input.serverId, "Server", "serverId") : null;
    const result = await ctx.ds.transaction(async (em) => {
      const current = await em.findOne(Disk, { where: { id: diskId, projectId: ctx.projectId } });
      if (!current) throw notFound("disk", input.diskId);
      if (!current.serverId) throw failedPrecondition("disk is not attached to a server");
      if (expectedServer && current.serverId !== expectedServer) throw failedPrecondition("disk is not attached to that server");
      const server = await em.findOne(Server, { where: { id: current.serverId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      const disk = await em.findOne(Disk, { where: { id: diskId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!server || !disk || disk.serverId !== server.id) throw conflict("the disk's attachment changed concurrently; try again");
      if (disk.type === DiskType.SYSTEM) throw failedPrecondition("the system disk cannot be detached");
      if (disk.status !== DiskStatus.IN_USE) throw failedPrecondition(`disk is ${disk.status}; it can be detached when IN_USE`);
      // A disk leaving its server leaves its NBD exports behind: whoever ran the server on it must not keep writing.
      await this.nbd.revokeDisks(em, [disk.id]);
      return { disk: await diskStatus.detach(em, disk), server };
    });
    ctx.invalidate();
    return result;
  }

  async delete(ctx: RequestContext, globalId: string): Promise<Disk> {
    const id = decodeId(globalId, "Disk", "id");
    const disk = await ctx.ds.transaction(async (em) => {
      const d = await em.findOne(Disk, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!d) throw notFound("disk", globalId);
      if (d.serverId) throw failedPrecondition(`disk is attached to a server as ${d.device}; detach it first`);
      if (d.status === DiskStatus.RESTORING || d.status === DiskStatus.CREATING) throw failedPrecondition(`cannot delete a disk that is ${d.status}`);
      await em.delete(Disk, { id, projectId: ctx.projectId });
      return d;
    });
    ctx.invalidate();
    return disk;
  }
}
