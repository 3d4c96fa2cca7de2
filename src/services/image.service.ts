import { DiskFormat, ExportStatus, ImageSource, ImageStatus, ImageType, OsType, type Image } from "../entities";
import type { RequestContext } from "./context";
import { notFound } from "./errors";
import { decodeId } from "./global-id";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs } from "./pagination";

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

export class ImageService {
  list(ctx: RequestContext, list: ListName & `${string}mages`, key: string, args: PageArgs & { filter?: ImageFilter | null }) {
    return ctx.loaders.connection(list, key, args, imageConditions(args.filter));
  }

  exports(ctx: RequestContext, imageId: string, args: PageArgs & { filter?: ImageExportFilter | null }) {
    return ctx.loaders.connection("imageExports", imageId, args, exportConditions(args.filter));
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Image> {
    const image = await ctx.loaders.image.load(decodeId(globalId, "Image", field));
    if (!image) throw notFound("image", globalId);
    return image;
  }
}
