import type { DataSource, EntityTarget, ObjectLiteral } from "typeorm";
import type { Read } from "../db/read-batch";
import { hydrate, readRows } from "../db/sql";
import { badInput } from "../domain/errors";
import { storableText } from "./validate";

export type SortField = "CREATED_AT" | "NAME";
export type SortDirection = "ASC" | "DESC";

export interface PageArgs {
  first?: number | null;
  after?: string | null;
  last?: number | null;
  before?: string | null;
  orderBy?: { field: SortField; direction: SortDirection } | null;
}

/** A WHERE fragment over alias `t`, with `$n` placeholders numbered from 1 within the fragment. */
export interface Condition {
  sql: string;
  params: unknown[];
}

/**
 * Where the rows of one kind of list come from. `key` is the SQL expression that
 * groups rows by their parent (t.project_id for top-level lists, t.server_id for a
 * server's disks, …), so one statement serves the lists of many parents at once.
 */
export interface ListSource<T extends ObjectLiteral> {
  entity: EntityTarget<T>;
  table: string;
  key: string;
  join?: string;
  /** A condition every row of the list meets. */
  where?: string;
}

/** A node and its cursor, encoded only when asked for. */
export class Edge<T extends { id: string }> {
  constructor(
    readonly node: T,
    private readonly sort: string | undefined,
  ) {}
  get cursor(): string {
    if (this.sort === undefined) throw new Error("the page was read without cursors");
    return encodeCursor(this.sort, this.node.id);
  }
}

export interface Page<T extends { id: string }> {
  edges: Edge<T>[];
  hasNextPage: boolean;
  hasPreviousPage: boolean;
  /** The size of the whole list, when it was counted with the page. */
  totalCount?: number;
}

/**
 * What a query reads of a list: the entity properties its nodes need (null: every
 * column) and whether it asks for the list's size, which then comes with the page.
 */
export interface ListSelection {
  properties: readonly string[] | null;
  count: boolean;
  /** Whether it reads cursors (edges or pageInfo). */
  cursors: boolean;
}

export const WHOLE_ROWS: ListSelection = { properties: null, count: false, cursors: true };

const SORT_SQL: Record<SortField, string> = { CREATED_AT: "t.created_at", NAME: "t.name" };

export interface ResolvedPage {
  limit: number;
  backward: boolean;
  cursor: { sort: string; id: string } | null;
  field: SortField;
  direction: SortDirection;
}

export function encodeCursor(sort: string, id: string): string {
  return Buffer.from(JSON.stringify([sort, id]), "utf8").toString("base64url");
}

function decodeCursor(cursor: string, field: string): { sort: string; id: string } {
  try {
    const value = JSON.parse(Buffer.from(cursor, "base64url").toString("utf8"));
    if (Array.isArray(value) && value.length === 2 && typeof value[0] === "string" && typeof value[1] === "string" && /^[0-9a-f-]{36}$/.test(value[1])) {
      return { sort: value[0], id: value[1] };
    }
  } catch {
    // fall through
  }
  throw badInput(field, "not a cursor from this list");
}

// created_at as Postgres writes it in text (the cursor's sort value when ordering by creation time).
const TIMESTAMP = /^(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2}):(\d{2})(\.\d{1,6})?[+-]\d{2}(:\d{2}){0,2}$/;

/**
 * A cursor decodes to values the SQL casts; one forged, or taken from a list in another
 * order, must be refused here, not fail the cast in Postgres.
 */
function checkCursorSort(sort: string, sortField: SortField, field: string): void {
  if (sortField === "NAME") {
    storableText(sort, field);
    return;
  }
  const m = TIMESTAMP.exec(sort);
  const [y, mo, d, h, mi, s] = (m ?? []).slice(1, 7).map(Number);
  const date = new Date(Date.UTC(y, mo - 1, d, h, mi, s));
  if (!m || y < 1 || date.getUTCMonth() !== mo - 1 || date.getUTCDate() !== d || h > 23 || mi > 59 || s > 59) {
    throw badInput(field, "not a cursor from this list in this order");
  }
}

/** Checks the Relay arguments once and turns them into what the SQL needs. */
export function resolvePage(args: PageArgs, maxPageSize: number, defaultPageSize = 20): ResolvedPage {
  const { first, last, after, before } = args;
  if (first != null && last != null) throw badInput("last", "use either first or last, not both");
  for (const [name, value] of [
    ["first", first],
    ["last", last],
  ] as const) {
    if (value != null && (!Number.isInteger(value) || value < 0 || value > maxPageSize)) {
      throw badInput(name, `must be between 0 and ${maxPageSize}`);
    }
  }
  const backward = last != null || (first == null && before != null && after == null);
  if (backward && after != null) throw badInput("after", "after goes with first; use before with last");
  if (!backward && before != null) throw badInput("before", "before goes with last; use after with first");
  const field = args.orderBy?.field ?? "CREATED_AT";
  const [cursorField, cursorArg] = backward ? (["before", before] as const) : (["after", after] as const);
  const cursor = cursorArg ? decodeCursor(cursorArg, cursorField) : null;
  if (cursor) checkCursorSort(cursor.sort, field, cursorField);
  return {
    limit: (backward ? last : first) ?? defaultPageSize,
    backward,
    cursor,
    field,
    direction: args.orderBy?.direction ?? "ASC",
  };
}

/** Renumbers a condition's $1..$n placeholders to follow `offset` parameters already bound. */
function shift(cond: Condition, offset: number): string {
  return cond.sql.replace(/\$(\d+)/g, (_, n) => `$${Number(n) + offset}`);
}

function whereClause(source: ListSource<ObjectLiteral>, projectId: string, keys: unknown[], conditions: Condition[]) {
  const params: unknown[] = [keys, projectId];
  const parts = [`${source.key} = ANY($1)`, `t.project_id = $2`, ...(source.where ? [source.where] : [])];
  for (const c of conditions) {
    parts.push(`(${shift(c, params.length)})`);
    params.push(...c.params);
  }
  return { sql: parts.join(" AND "), params };
}

/** The columns of `properties` (the id always), or every column. */
function columnsOf(ds: DataSource, entity: EntityTarget<ObjectLiteral>, properties: readonly string[] | null): string[] {
  const meta = ds.getMetadata(entity);
  if (!properties) return meta.columns.map((c) => c.databaseName);
  const names = new Set(["id"]);
  for (const p of properties) {
    const column = meta.findColumnWithPropertyName(p);
    if (!column) return meta.columns.map((c) => c.databaseName); // a field the entity does not hold: read it all, as without a selection
    names.add(column.databaseName);
  }
  return [...names];
}

/**
 * One page of each parent's list in a single statement: rows are numbered per
 * parent by a window function and the first limit+1 of each are kept. Only the
 * selected columns are read; a first page asked with its total counts it in the
 * same statement (a parent with no row has none).
 */
export async function loadPages<T extends ObjectLiteral & { id: string }>(
  ds: DataSource,
  source: ListSource<T>,
  projectId: string,
  keys: readonly string[],
  page: ResolvedPage,
  conditions: Condition[],
  select: ListSelection = WHOLE_ROWS,
  read: Read = (text, values) => readRows(ds, text, values),
): Promise<Map<string, Page<T>>> {
  const sortSql = SORT_SQL[page.field];
  // Walking backward reads the list in the opposite order, then reverses each page.
  const ascending = (page.direction === "ASC") !== page.backward;
  const dir = ascending ? "ASC" : "DESC";
  const all = [...conditions];
  if (page.cursor) {
    all.push({
      sql: `(${sortSql}, t.id) ${ascending ? ">" : "<"} ($1::${page.field === "CREATED_AT" ? "timestamptz" : "text"}, $2::uuid)`,
      params: [page.cursor.sort, page.cursor.id],
    });
  }
  const counted = select.count && !page.cursor && page.limit > 0;
  const where = whereClause(source as ListSource<ObjectLiteral>, projectId, [...keys], all);
  const limitParam = where.params.length + 1;
  const columns = columnsOf(ds, source.entity as EntityTarget<ObjectLiteral>, select.properties);
  const extra = [`"__key"`, ...(select.cursors ? [`"__sort"`] : []), ...(counted ? [`"__total"`] : [])];
  const sql = `
    SELECT ${[...columns, ...extra].join(", ")} FROM (
      SELECT ${columns.map((c) => `t.${c}`).join(", ")}, ${source.key}::text AS "__key", ${sortSql}::text AS "__sort",
             ROW_NUMBER() OVER (PARTITION BY ${source.key} ORDER BY ${sortSql} ${dir}, t.id ${dir}) AS "__rn"${
               counted
                 ? `,
             count(*) OVER (PARTITION BY ${source.key}) AS "__total"`
                 : ""
             }
      FROM ${source.table} t ${source.join ?? ""}
      WHERE ${where.sql}
    ) ranked
    WHERE "__rn" <= $${limitParam}
    ORDER BY "__key", "__rn"`;
  const rows = await read(sql, [...where.params, page.limit + 1]);
  const entities = hydrate(ds, source.entity, rows);

  const grouped = new Map<string, Edge<T>[]>();
  const totals = new Map<string, number>();
  rows.forEach((row, i) => {
    const key = row.__key as string;
    let list = grouped.get(key);
    if (!list) {
      grouped.set(key, (list = []));
      if (counted) totals.set(key, Number(row.__total));
    }
    list.push(new Edge(entities[i], row.__sort as string | undefined));
  });
  const result = new Map<string, Page<T>>();
  for (const key of keys) {
    const fetched = grouped.get(key) ?? [];
    const more = fetched.length > page.limit;
    const edges = fetched.slice(0, page.limit);
    if (page.backward) edges.reverse();
    result.set(key, {
      edges,
      // Rows on the far side of the cursor exist: the cursor's own row at least.
      hasNextPage: page.backward ? page.cursor !== null : more,
      hasPreviousPage: page.backward ? more : page.cursor !== null,
      ...(counted ? { totalCount: totals.get(key) ?? 0 } : {}),
    });
  }
  return result;
}

/** The size of each parent's whole list (filters applied, pagination not), in one statement. */
export async function loadCounts<T extends ObjectLiteral>(
  ds: DataSource,
  source: ListSource<T>,
  projectId: string,
  keys: readonly string[],
  conditions: Condition[],
  read: Read = (text, values) => readRows(ds, text, values),
): Promise<Map<string, number>> {
  const where = whereClause(source as ListSource<ObjectLiteral>, projectId, [...keys], conditions);
  const rows = (await read(`SELECT ${source.key}::text AS key, count(*) AS count FROM ${source.table} t ${source.join ?? ""} WHERE ${where.sql} GROUP BY 1`, where.params)) as {
    key: string;
    count: string;
  }[];
  const counts = new Map(keys.map((k) => [k, 0]));
  for (const r of rows) counts.set(r.key, Number(r.count));
  return counts;
}

/** Escapes LIKE wildcards so a name filter matches the text as typed. */
export function likeSubstring(text: string): string {
  return `%${text.replace(/[\\%_]/g, (c) => `\\${c}`)}%`;
}
