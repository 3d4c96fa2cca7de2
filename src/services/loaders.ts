import DataLoader from "dataloader";
import type { DataSource, EntityTarget, ObjectLiteral } from "typeorm";
import { batchedReads, type Read } from "../db/read-batch";
import { hydrate } from "../db/sql";
import { Backup, Disk, DiskType, Image, ImageExport, Job, NbdExport, Policy, Server } from "../entities";
import { lists, type ListName } from "./lists";
import { loadCounts, loadPages, resolvePage, WHOLE_ROWS, type Condition, type ListSelection, type Page, type PageArgs, type ResolvedPage } from "./pagination";

/** Rows of one table by a uuid column, in the project, through the same hydration as the lists. */
function byColumn<T extends ObjectLiteral & { id: string }>(ds: DataSource, read: Read, entity: EntityTarget<T>, projectId: string, column: string, where = "") {
  const table = ds.getMetadata(entity).tableName;
  return async (keys: readonly string[]): Promise<T[]> => hydrate(ds, entity, await read(`SELECT * FROM ${table} WHERE ${column} = ANY($1) AND project_id = $2${where}`, [[...keys], projectId]));
}

/**
 * Rows of one table by id. The loaders of several tables asked in one tick dispatch
 * together, and their reads go to Postgres as one statement (`batchedReads`).
 */
function byId<T extends ObjectLiteral & { id: string }>(ds: DataSource, read: Read, entity: EntityTarget<T>, projectId: string) {
  const load = byColumn(ds, read, entity, projectId, "id");
  return new DataLoader<string, T | null>(async (ids) => {
    const map = new Map((await load(ids)).map((r) => [r.id, r]));
    return ids.map((id) => map.get(id) ?? null);
  });
}

/** A page of a list plus the count of the whole list, fetched only when asked for. */
export class Connection<T extends { id: string }> {
  constructor(
    private readonly page: Page<T>,
    private readonly count: () => Promise<number>,
  ) {}
  get edges() {
    return this.page.edges;
  }
  get nodes() {
    return this.page.edges.map((e) => e.node);
  }
  get pageInfo() {
    const { edges } = this.page;
    return {
      hasNextPage: this.page.hasNextPage,
      hasPreviousPage: this.page.hasPreviousPage,
      startCursor: edges[0]?.cursor ?? null,
      endCursor: edges[edges.length - 1]?.cursor ?? null,
    };
  }
  get totalCount(): number | Promise<number> {
    return this.page.totalCount ?? this.count();
  }
}

/**
 * The DataLoaders of one request (or one subscription event), scoped to one project.
 * Lists are batched per (list, filter, page) so that the lists of all parents at one
 * place of a query come from one read, and the reads of one level (every list and
 * every row by id it asks for) go to Postgres as one statement.
 */
export function createLoaders(ds: DataSource, projectId: string, maxPageSize: number) {
  const read = batchedReads(ds);
  const pageLoaders = new Map<string, DataLoader<string, Page<any>>>();
  const countLoaders = new Map<string, DataLoader<string, number>>();

  function connection<N extends ListName>(
    name: N,
    key: string,
    args: PageArgs,
    conditions: Condition[] = [],
    select: ListSelection = WHOLE_ROWS,
  ): Promise<Connection<InstanceType<(typeof lists)[N]["entity"]>>> {
    const source = lists[name];
    const page: ResolvedPage = resolvePage(args, maxPageSize);
    const condKey = JSON.stringify(conditions);
    const pageKey = `${name}|${condKey}|${JSON.stringify(page)}|${select.count}|${select.cursors}|${select.properties?.join(",") ?? "*"}`;
    let pages = pageLoaders.get(pageKey);
    if (!pages) {
      pages = new DataLoader(async (keys) => {
        const map = await loadPages(ds, source as never, projectId, keys, page, conditions, select, read);
        return keys.map((k) => map.get(k)!);
      });
      pageLoaders.set(pageKey, pages);
    }
    const countKey = `${name}|${condKey}`;
    let counts = countLoaders.get(countKey);
    if (!counts) {
      counts = new DataLoader(async (keys) => {
        const map = await loadCounts(ds, source as never, projectId, keys, conditions, read);
        return keys.map((k) => map.get(k)!);
      });
      countLoaders.set(countKey, counts);
    }
    const countLoader = counts;
    return pages.load(key).then((p) => new Connection(p, () => countLoader.load(key)));
  }

  const systemDisks = byColumn(ds, read, Disk, projectId, "server_id", ` AND type = '${DiskType.SYSTEM}'`);

  return {
    server: byId(ds, read, Server, projectId),
    disk: byId(ds, read, Disk, projectId),
    backup: byId(ds, read, Backup, projectId),
    image: byId(ds, read, Image, projectId),
    imageExport: byId(ds, read, ImageExport, projectId),
    policy: byId(ds, read, Policy, projectId),
    job: byId(ds, read, Job, projectId),
    nbdExport: byId(ds, read, NbdExport, projectId),
    systemDisk: new DataLoader<string, Disk | null>(async (serverIds) => {
      const rows = await systemDisks(serverIds);
      const map = new Map(rows.map((d) => [d.serverId, d]));
      return serverIds.map((id) => map.get(id) ?? null);
    }),
    connection,
  };
}

export type Loaders = ReturnType<typeof createLoaders>;
