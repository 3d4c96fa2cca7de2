import type { EntityManager } from "typeorm";
import { Disk, DiskStatus, DiskType, ImageType, JobType, OsType, Server, ServerStatus, type Job } from "../entities";
import { imageDataBytes } from "../storage/clones";
import * as diskStatus from "../domain/status/disk";
import * as serverStatus from "../domain/status/server";
import type { ImageService } from "./image.service";
import type { JobQueue } from "./job-queue";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badInput, failedPrecondition, notFound } from "../domain/errors";
import { decodeId } from "./global-id";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs, type ListSelection } from "./pagination";
import { derivedName, diskSize, intInRange, MiB, resourceName } from "./validate";

export interface ServerFilter {
  statuses?: ServerStatus[] | null;
  osTypes?: OsType[] | null;
  name?: string | null;
  imageId?: string | null;
}

export interface CreateServerInput {
  name: string;
  vcpus: number;
  memoryMiB: number;
  osType?: OsType | null;
  imageId?: string | null;
  systemDiskSizeBytes?: number | null;
  dataDisks?: { name?: string | null; sizeBytes?: number | null; imageId?: string | null }[] | null;
  /** Copy the blocks of disks made from images into their own storage in the background. */
  hydrate?: boolean | null;
}

/** Device names in attachment order: the system disk is vda, data disks vdb to vdz. */
export const DEVICES = Array.from({ length: 26 }, (_, i) => `/dev/vd${String.fromCharCode(97 + i)}`);
export const MAX_DATA_DISKS = DEVICES.length - 1;

export function serverConditions(filter: ServerFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter.osTypes?.length) out.push({ sql: "t.os_type = ANY($1)", params: [filter.osTypes] });
  if (filter.name) out.push({ sql: "t.name ILIKE $1", params: [likeSubstring(filter.name)] });
  if (filter.imageId) out.push({ sql: "t.source_image_id = $1", params: [decodeId(filter.imageId, "Image", "filter.imageId")] });
  return out;
}

const roundUpMiB = (n: number) => Math.ceil(n / MiB) * MiB;

export class ServerService {
  constructor(
    private readonly queue: JobQueue,
    private readonly images: ImageService,
  ) {}

  list(ctx: RequestContext, list: ListName & `${string}ervers`, key: string, args: PageArgs & { filter?: ServerFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection(list, key, args, serverConditions(args.filter), select);
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Server> {
    const server = await ctx.loaders.server.load(decodeId(globalId, "Server", field));
    if (!server) throw notFound("server", globalId);
    return server;
  }

  /**
   * Creates a server with a system disk (/dev/vda) and data disks (/dev/vdb, …):
   * blank, or made from images. A SYSTEM_DISK image makes the system disk; a
   * FULL_SERVER image recreates every disk it holds; DATA_DISK images make data
   * disks. Disks from images are clones, so the server is ACTIVE at once; with
   * `hydrate`, a job copies their blocks into their own storage in the background.
   */
  async create(ctx: RequestContext, input: CreateServerInput): Promise<{ server: Server; disks: Disk[]; job: Job | null }> {
    const name = resourceName(input.name, "name");
    const vcpus = intInRange(input.vcpus, "vcpus", 1, 256);
    const memoryMib = intInRange(input.memoryMiB, "memoryMiB", 128, 4 * 1024 * 1024);
    const dataDisks = input.dataDisks ?? [];
    const max = ctx.config.maxDiskBytes;

    const result = await ctx.ds.transaction(async (em) => {
      type Spec = { name: string; type: DiskType; sizeBytes: number; imageId: string | null; imageDiskId: string | null };
      const specs: Spec[] = [];
      let osType = input.osType ?? null;
      let sourceImageId: string | null = null;
      if (input.imageId) {
        const { image, disks } = await this.images.imageDisks(em, ctx, input.imageId, "imageId");
        if (image.type === ImageType.DATA_DISK) throw badInput("imageId", "a DATA_DISK image makes disks, not servers; use a SYSTEM_DISK or FULL_SERVER image");
        sourceImageId = image.id;
        osType ??= image.osType;
        disks.forEach((d, i) => {
          const minimum = roundUpMiB(Math.max(d.sizeBytes, i === 0 ? image.minDiskBytes : 0));
          let size = minimum;
          if (i === 0 && input.systemDiskSizeBytes != null) {
            size = diskSize(input.systemDiskSizeBytes, "systemDiskSizeBytes", max);
            if (size < minimum) throw badInput("systemDiskSizeBytes", `must be at least the image's ${minimum} bytes`);
          }
          specs.push({ name: derivedName(name, i === 0 ? "-system" : `-data-${i}`), type: i === 0 ? DiskType.SYSTEM : DiskType.DATA, sizeBytes: size, imageId: image.id, imageDiskId: d.id });
        });
      } else {
        if (input.systemDiskSizeBytes == null) throw badInput("systemDiskSizeBytes", "is required when no imageId is given");
        specs.push({ name: derivedName(name, "-system"), type: DiskType.SYSTEM, sizeBytes: diskSize(input.systemDiskSizeBytes, "systemDiskSizeBytes", max), imageId: null, imageDiskId: null });
      }
      const first = specs.length;
      for (const [i, d] of dataDisks.entries()) {
        const field = `dataDisks[${i}]`;
        let imageDiskId: string | null = null;
        let minimum = 0;
        if (d.imageId) {
          const { image, disks } = await this.images.imageDisks(em, ctx, d.imageId, `${field}.imageId`);
          if (image.type !== ImageType.DATA_DISK) throw badInput(`${field}.imageId`, "data disks are made from DATA_DISK images");
          imageDiskId = disks[0].id;
          minimum = roundUpMiB(Math.max(disks[0].sizeBytes, image.minDiskBytes));
        }
        const size = d.sizeBytes == null ? minimum : diskSize(d.sizeBytes, `${field}.sizeBytes`, max);
        if (size < minimum || size === 0) throw badInput(`${field}.sizeBytes`, minimum ? `must be at least the image's ${minimum} bytes` : "is required for a blank disk");
        specs.push({
          name: d.name == null ? derivedName(name, `-data-${first + i}`) : resourceName(d.name, `${field}.name`),
          type: DiskType.DATA,
          sizeBytes: size,
          imageId: d.imageId ? decodeId(d.imageId, "Image", `${field}.imageId`) : null,
          imageDiskId,
        });
      }
      if (specs.length > DEVICES.length) throw badInput("dataDisks", `at most ${MAX_DATA_DISKS} data disks`);
      // Disks from images are clones: usable at once, their blocks read from the images in the vault until written.
      const used = await imageDataBytes(
        em,
        specs.flatMap((s) => (s.imageDiskId ? [s.imageDiskId] : [])),
      );
      let u = 0;
      const server = await em.save(em.create(Server, { projectId: ctx.projectId, name, vcpus, memoryMib, osType: osType ?? OsType.LINUX, status: ServerStatus.ACTIVE, sourceImageId }));
      const disks = await em.save(
        specs.map((s, i) =>
          em.create(Disk, {
            projectId: ctx.projectId,
            name: s.name,
            type: s.type,
            sizeBytes: s.sizeBytes,
            usedBytes: s.imageDiskId ? used[u++] : 0,
            status: DiskStatus.IN_USE,
            serverId: server.id,
            device: DEVICES[i],
            sourceImageId: s.imageId,
            sourceBackupId: null,
            cloneImageId: s.imageDiskId ? s.imageId : null,
            cloneImageDiskId: s.imageDiskId,
          }),
        ),
      );
      const clones = disks.filter((_, i) => specs[i].imageDiskId).map((d) => d.id);
      const job =
        input.hydrate && clones.length ? await this.queue.add(em, ctx.projectId, { type: JobType.CREATE_DISK, serverId: server.id, imageId: sourceImageId, payload: { hydrate: clones } }) : null;
      return { server, disks, job };
    });
    if (result.job) await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  async start(ctx: RequestContext, globalId: string): Promise<Server> {
    return this.transition(ctx, globalId, ServerStatus.SHUTOFF, ServerStatus.ACTIVE, "start");
  }

  async stop(ctx: RequestContext, globalId: string): Promise<Server> {
    return this.transition(ctx, globalId, ServerStatus.ACTIVE, ServerStatus.SHUTOFF, "stop");
  }

  private async transition(ctx: RequestContext, globalId: string, from: ServerStatus, to: ServerStatus.ACTIVE | ServerStatus.SHUTOFF, verb: string): Promise<Server> {
    const id = decodeId(globalId, "Server", "id");
    const server = await ctx.ds.transaction(async (em) => {
      const s = await this.lock(em, ctx, id, globalId);
      if (s.status !== from) throw failedPrecondition(`cannot ${verb} a server that is ${s.status}; it must be ${from}`);
      return serverStatus.switchPower(em, s, to);
    });
    ctx.invalidate();
    return server;
  }

  /**
   * Deletes a server and its system disk. Data disks are deleted too when
   * `deleteDisks`, otherwise detached and left AVAILABLE. Backups and images made
   * from the server stay.
   */
  async delete(ctx: RequestContext, globalId: string, deleteDisks: boolean): Promise<{ server: Server; deletedDiskIds: string[]; detachedDiskIds: string[] }> {
    const id = decodeId(globalId, "Server", "id");
    const result = await ctx.ds
      .transaction(async (em) => {
        const server = await this.lock(em, ctx, id, globalId);
        if (server.status === ServerStatus.RESTORING || server.status === ServerStatus.BUILDING) {
          throw failedPrecondition(`cannot delete a server that is ${server.status}`);
        }
        const disks = await em.find(Disk, { where: { serverId: id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        const busy = disks.find((d) => d.status === DiskStatus.RESTORING || d.status === DiskStatus.CREATING);
        if (busy) throw failedPrecondition(`cannot delete the server while its disk ${busy.name} is ${busy.status}`);
        const toDelete = disks.filter((d) => d.type === DiskType.SYSTEM || deleteDisks);
        const toDetach = disks.filter((d) => !toDelete.includes(d));
        if (toDetach.length) {
          await diskStatus.detachAll(
            em,
            toDetach.map((d) => d.id),
          );
        }
        if (toDelete.length)
          await em.delete(
            Disk,
            toDelete.map((d) => d.id),
          );
        await em.delete(Server, { id, projectId: ctx.projectId });
        return { server, deletedDiskIds: toDelete.map((d) => d.id), detachedDiskIds: toDetach.map((d) => d.id) };
      })
      .catch((err) => {
        throw translateDbError(err);
      });
    ctx.invalidate();
    return result;
  }

  async lock(em: EntityManager, ctx: RequestContext, id: string, globalId: string): Promise<Server> {
    const server = await em.findOne(Server, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
    if (!server) throw notFound("server", globalId);
    return server;
  }
}
