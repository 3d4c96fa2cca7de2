import type { EntityManager } from "typeorm";
import { Disk, DiskStatus, DiskType, Image, OsType, Server, ServerStatus } from "../entities";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badInput, failedPrecondition, notFound } from "./errors";
import { decodeId } from "./global-id";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs } from "./pagination";
import { diskSize, intInRange, resourceName } from "./validate";

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
  dataDisks?: { name?: string | null; sizeBytes: number; imageId?: string | null }[] | null;
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

export class ServerService {
  list(ctx: RequestContext, list: ListName & `${string}ervers`, key: string, args: PageArgs & { filter?: ServerFilter | null }) {
    return ctx.loaders.connection(list, key, args, serverConditions(args.filter));
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Server> {
    const server = await ctx.loaders.server.load(decodeId(globalId, "Server", field));
    if (!server) throw notFound("server", globalId);
    return server;
  }

  async create(ctx: RequestContext, input: CreateServerInput): Promise<{ server: Server; disks: Disk[] }> {
    const name = resourceName(input.name, "name");
    const vcpus = intInRange(input.vcpus, "vcpus", 1, 256);
    const memoryMib = intInRange(input.memoryMiB, "memoryMiB", 128, 4 * 1024 * 1024);
    const dataDisks = input.dataDisks ?? [];
    if (dataDisks.length > MAX_DATA_DISKS) throw badInput("dataDisks", `at most ${MAX_DATA_DISKS} data disks`);
    if (input.imageId || dataDisks.some((d) => d.imageId)) {
      // Images come with the image service; until one exists, every image ID is unknown.
      const field = input.imageId ? "imageId" : `dataDisks[${dataDisks.findIndex((d) => d.imageId)}].imageId`;
      const imageId = decodeId((input.imageId ?? dataDisks.find((d) => d.imageId)!.imageId)!, "Image", field);
      const image = await ctx.ds.getRepository(Image).findOneBy({ id: imageId, projectId: ctx.projectId });
      if (!image) throw notFound("image", input.imageId ?? undefined);
      throw failedPrecondition("creating servers and disks from images is not supported by this version");
    }
    if (input.systemDiskSizeBytes == null) throw badInput("systemDiskSizeBytes", "is required when no imageId is given");
    const systemSize = diskSize(input.systemDiskSizeBytes, "systemDiskSizeBytes", ctx.config.maxDiskBytes);
    const dataSpecs = dataDisks.map((d, i) => ({
      name: d.name == null ? `${name}-data-${i + 1}` : resourceName(d.name, `dataDisks[${i}].name`),
      sizeBytes: diskSize(d.sizeBytes, `dataDisks[${i}].sizeBytes`, ctx.config.maxDiskBytes),
    }));

    const result = await ctx.ds.transaction(async (em) => {
      const server = await em.save(
        em.create(Server, {
          projectId: ctx.projectId,
          name,
          vcpus,
          memoryMib,
          osType: input.osType ?? OsType.LINUX,
          status: ServerStatus.ACTIVE,
          sourceImageId: null,
        }),
      );
      const disks = await em.save(
        [
          { name: `${name}-system`, type: DiskType.SYSTEM, sizeBytes: systemSize },
          ...dataSpecs.map((d) => ({ ...d, type: DiskType.DATA })),
        ].map((d, i) =>
          em.create(Disk, {
            ...d,
            projectId: ctx.projectId,
            status: DiskStatus.IN_USE,
            serverId: server.id,
            device: DEVICES[i],
            usedBytes: 0,
          }),
        ),
      );
      return { server, disks };
    });
    ctx.invalidate();
    return result;
  }

  async start(ctx: RequestContext, globalId: string): Promise<Server> {
    return this.transition(ctx, globalId, ServerStatus.SHUTOFF, ServerStatus.ACTIVE, "start");
  }

  async stop(ctx: RequestContext, globalId: string): Promise<Server> {
    return this.transition(ctx, globalId, ServerStatus.ACTIVE, ServerStatus.SHUTOFF, "stop");
  }

  private async transition(ctx: RequestContext, globalId: string, from: ServerStatus, to: ServerStatus, verb: string): Promise<Server> {
    const id = decodeId(globalId, "Server", "id");
    const server = await ctx.ds.transaction(async (em) => {
      const s = await this.lock(em, ctx, id, globalId);
      if (s.status !== from) throw failedPrecondition(`cannot ${verb} a server that is ${s.status}; it must be ${from}`);
      s.status = to;
      return em.save(s);
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
          await em.update(Disk, toDetach.map((d) => d.id), { serverId: null, device: null, status: DiskStatus.AVAILABLE });
        }
        if (toDelete.length) await em.delete(Disk, toDelete.map((d) => d.id));
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
