import DataLoader from "dataloader";
import type { DataSource, EntityTarget, ObjectLiteral } from "typeorm";
import { batchedReads, type Read } from "../db/read-batch";
import { hydrate } from "../db/sql";
import { Backup, Disk, DiskType, Image, ImageExport, Job, Policy, Server } from "../entities";
import { lists, type ListName } from "./lists";
import { loadCounts, loadPages, resolvePage, WHOLE_ROWS, type Condition, type ListSelection, type Page, type PageArgs, type ResolvedPage } from "./pagination";

/** Rows of one table by a uuid column, in the project, through the same hydration as the lists. */
function byColumn<T extends ObjectLiteral & { id: string }>(ds: DataSource, read: Read, entity: EntityTarget<T>, projectId: string, column: string, where = "") {
  const table = ds.getMetadata(entity).tableName;
  return async (keys: readonly string[]): Promise<T[]> => hydrate(ds, entity, await read(`SELECT * FROM ${table} WHERE ${column} = ANY($1) AND project_id = $2${where}`, [[...keys], projectId]));
}

/** The node tables rows are loaded from by id. */
const BY_ID = { server: Server, disk: Disk, backup: Backup, image: Image, imageExport: ImageExport, policy: Policy, job: Job } as const;
type ByIdKind = keyof typeof BY_ID;

/**
 * Rows by id of any node table, in the project. The ids asked for in one tick, of
 * whatever tables, come from one statement: one table's rows as they are, several
 * tables' as one JSON value per row (a UNION ALL needs one row shape).
 */
function rowsById(ds: DataSource, read: Read, projectId: string) {
  const tables = Object.fromEntries(Object.entries(BY_ID).map(([kind, entity]) => [kind, ds.getMetadata(entity).tableName])) as Record<ByIdKind, string>;
  const shared = new DataLoader<string, ObjectLiteral | null>(async (keys) => {
    const ids = new Map<ByIdKind, string[]>();
    for (const key of keys) {
      const [kind, id] = key.split(":") as [ByIdKind, string];
      const list = ids.get(kind);
      if (list) list.push(id);
      else ids.set(kind, [id]);
    }
    const found = new Map<string, ObjectLiteral>();
    const kinds = [...ids.keys()];
    if (kinds.length === 1) {
      const [kind] = kinds;
      const rows = await read(`SELECT * FROM ${tables[kind]} WHERE id = ANY($1) AND project_id = $2`, [ids.get(kind), projectId]);
      for (const row of hydrate(ds, BY_ID[kind], rows)) found.set(`${kind}:${row.id}`, row);
    } else {
      const parts = kinds.map((kind, i) => `SELECT ${i} AS kind, to_json(t) AS row FROM ${tables[kind]} t WHERE id = ANY($${i + 2}) AND project_id = $1`);
      const rows = (await read(parts.join(" UNION ALL "), [projectId, ...kinds.map((k) => ids.get(k))])) as { kind: number; row: Record<string, unknown> }[];
      for (const { kind, row } of rows) {
        const [entity] = hydrate(ds, BY_ID[kinds[kind]], [row]);
        found.set(`${kinds[kind]}:${entity.id}`, entity);
      }
    }
    return keys.map((key) => found.get(key) ?? null);
  });
  return <K extends ByIdKind>(kind: K) => ({
    load: (id: string) => shared.load(`${kind}:${id}`) as Promise<InstanceType<(typeof BY_ID)[K]> | null>,
    loadMany: (ids: readonly string[]) => shared.loadMany(ids.map((id) => `${kind}:${id}`)) as Promise<(InstanceType<(typeof BY_ID)[K]> | null | Error)[]>,
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

  const byId = rowsById(ds, read, projectId);

  return {
    server: byId("server"),
    disk: byId("disk"),
    backup: byId("backup"),
    image: byId("image"),
    imageExport: byId("imageExport"),
    policy: byId("policy"),
    job: byId("job"),
    systemDisk: new DataLoader<string, Disk | null>(async (serverIds) => {
      const rows = await systemDisks(serverIds);
      const map = new Map(rows.map((d) => [d.serverId, d]));
      return serverIds.map((id) => map.get(id) ?? null);
    }),
    connection,
  };
}

export type Loaders = ReturnType<typeof createLoaders>;
