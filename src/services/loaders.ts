import DataLoader from "dataloader";
import { In, type DataSource, type EntityTarget, type ObjectLiteral } from "typeorm";
import { Backup, Disk, DiskType, Image, ImageExport, Job, Policy, Server } from "../entities";
import { lists, type ListName } from "./lists";
import { loadCounts, loadPages, resolvePage, type Condition, type Page, type PageArgs, type ResolvedPage } from "./pagination";

function byId<T extends ObjectLiteral & { id: string }>(ds: DataSource, entity: EntityTarget<T>, projectId: string) {
  return new DataLoader<string, T | null>(async (ids) => {
    const rows = await ds.getRepository(entity).findBy({ id: In([...ids]), projectId } as never);
    const map = new Map(rows.map((r) => [r.id, r]));
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
  get totalCount(): Promise<number> {
    return this.count();
  }
}

/**
 * The DataLoaders of one request (or one subscription event), scoped to one project.
 * Lists are batched per (list, filter, page) so that the lists of all parents at one
 * level of a query come from one statement.
 */
export function createLoaders(ds: DataSource, projectId: string, maxPageSize: number) {
  const pageLoaders = new Map<string, DataLoader<string, Page<any>>>();
  const countLoaders = new Map<string, DataLoader<string, number>>();

  function connection<N extends ListName>(name: N, key: string, args: PageArgs, conditions: Condition[] = []): Promise<Connection<InstanceType<(typeof lists)[N]["entity"]>>> {
    const source = lists[name];
    const page: ResolvedPage = resolvePage(args, maxPageSize);
    const condKey = JSON.stringify(conditions);
    const pageKey = `${name}|${condKey}|${JSON.stringify(page)}`;
    let pages = pageLoaders.get(pageKey);
    if (!pages) {
      pages = new DataLoader(async (keys) => {
        const map = await loadPages(ds, source as never, projectId, keys, page, conditions);
        return keys.map((k) => map.get(k)!);
      });
      pageLoaders.set(pageKey, pages);
    }
    const countKey = `${name}|${condKey}`;
    let counts = countLoaders.get(countKey);
    if (!counts) {
      counts = new DataLoader(async (keys) => {
        const map = await loadCounts(ds, source as never, projectId, keys, conditions);
        return keys.map((k) => map.get(k)!);
      });
      countLoaders.set(countKey, counts);
    }
    const countLoader = counts;
    return pages.load(key).then((p) => new Connection(p, () => countLoader.load(key)));
  }

  return {
    server: byId(ds, Server, projectId),
    disk: byId(ds, Disk, projectId),
    backup: byId(ds, Backup, projectId),
    image: byId(ds, Image, projectId),
    imageExport: byId(ds, ImageExport, projectId),
    policy: byId(ds, Policy, projectId),
    job: byId(ds, Job, projectId),
    systemDisk: new DataLoader<string, Disk | null>(async (serverIds) => {
      const rows = await ds.getRepository(Disk).findBy({ serverId: In([...serverIds]), projectId, type: DiskType.SYSTEM });
      const map = new Map(rows.map((d) => [d.serverId, d]));
      return serverIds.map((id) => map.get(id) ?? null);
    }),
    connection,
  };
}

export type Loaders = ReturnType<typeof createLoaders>;
