import { BackupResourceType, BackupStatus, BackupTrigger, type Backup } from "../entities";
import type { RequestContext } from "./context";
import { notFound } from "./errors";
import { decodeId, fromGlobalId } from "./global-id";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs } from "./pagination";
import { badInput } from "./errors";

export interface BackupFilter {
  statuses?: BackupStatus[] | null;
  resourceTypes?: BackupResourceType[] | null;
  triggers?: BackupTrigger[] | null;
  name?: string | null;
  resourceId?: string | null;
  policyId?: string | null;
  /** Only top-level backups (a server backup, not its per-disk children). */
  topLevel?: boolean | null;
}

export function backupConditions(filter: BackupFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter.resourceTypes?.length) out.push({ sql: "t.resource_type = ANY($1)", params: [filter.resourceTypes] });
  if (filter.triggers?.length) out.push({ sql: "t.trigger = ANY($1)", params: [filter.triggers] });
  if (filter.name) out.push({ sql: "t.name ILIKE $1", params: [likeSubstring(filter.name)] });
  if (filter.resourceId) {
    const parsed = fromGlobalId(filter.resourceId);
    if (!parsed || (parsed.type !== "Server" && parsed.type !== "Disk")) throw badInput("filter.resourceId", "not a Server or Disk ID");
    out.push({ sql: "t.resource_id = $1", params: [parsed.id] });
  }
  if (filter.policyId) out.push({ sql: "t.policy_id = $1", params: [decodeId(filter.policyId, "Policy", "filter.policyId")] });
  if (filter.topLevel != null) out.push({ sql: filter.topLevel ? "t.parent_id IS NULL" : "t.parent_id IS NOT NULL", params: [] });
  return out;
}

export class BackupService {
  list(ctx: RequestContext, list: ListName & `${string}ackups` | "backupChildren", key: string, args: PageArgs & { filter?: BackupFilter | null }) {
    return ctx.loaders.connection(list, key, args, backupConditions(args.filter));
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Backup> {
    const backup = await ctx.loaders.backup.load(decodeId(globalId, "Backup", field));
    if (!backup) throw notFound("backup", globalId);
    return backup;
  }
}
