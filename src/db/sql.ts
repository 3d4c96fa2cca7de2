import type { DataSource, EntityManager, EntityMetadata, EntityTarget, ObjectLiteral } from "typeorm";

export type Queryable = DataSource | EntityManager;

/**
 * The rows a statement returns. TypeORM answers UPDATE and DELETE with
 * [rows, affected] and everything else with rows; this evens that out.
 */
export async function rows<T = Record<string, unknown>>(q: Queryable, sql: string, params: unknown[] = []): Promise<T[]> {
  const r = await q.query(sql, params);
  if (Array.isArray(r) && r.length === 2 && Array.isArray(r[0]) && typeof r[1] === "number") return r[0] as T[];
  return r as T[];
}

/** How many distinct statement texts `readRows` names; each connection keeps the plans of those it has run. */
const PREPARED_TEXTS = 200;
const preparedNames = new Map<string, string>();

/**
 * The rows of a read the graph sends over and over with other values (a page of a
 * list, rows by id). It goes as a named statement, so each connection parses and
 * plans it once (a generic plan after a few runs) instead of on every request; for
 * these short statements planning costs about what running them does. The first
 * PREPARED_TEXTS distinct texts are named, any later one is sent unnamed, so a
 * client varying its selections cannot grow the connections' memory without end.
 */
export async function readRows(ds: DataSource, text: string, values: unknown[]): Promise<Record<string, unknown>[]> {
  let name = preparedNames.get(text);
  if (name === undefined && preparedNames.size < PREPARED_TEXTS) {
    name = `stowage_read_${preparedNames.size}`;
    preparedNames.set(text, name);
  }
  // TypeORM hands the query on to pg as it is: its logging, slow-query warning and error wrapping still apply.
  return ds.query((name ? { name, text, values } : text) as string, name ? undefined : values);
}

type Hydrator = (row: Record<string, unknown>) => unknown;

const hydrators = new WeakMap<object, Hydrator>();

/** Column types whose values pg already parses into what the entity holds. */
const AS_PARSED = new Set<unknown>(["uuid", "text", "int", "boolean", "real", "timestamptz"]);

/**
 * The function that makes one entity of one raw row, built once per entity: columns
 * pg already parses (and that have no transformer) are copied as they are, the rest go
 * through TypeORM's own hydration. A column the row does not hold is left unset, so a
 * statement may select only the columns it needs.
 */
function hydratorOf(ds: DataSource, meta: EntityMetadata): Hydrator {
  const cached = hydrators.get(meta);
  if (cached) return cached;
  const columns = meta.columns.map((col) => ({
    property: col.propertyName,
    name: col.databaseName,
    direct: !col.transformer && AS_PARSED.has(col.type),
    col,
  }));
  // An instance of the entity class holding only the columns read: its constructor would
  // first define every declared field (class fields are defined, as undefined).
  const target = meta.target;
  const make =
    typeof target === "function"
      ? (
          (proto: object) => () =>
            Object.create(proto) as Record<string, unknown>
        )(target.prototype)
      : () => meta.create() as Record<string, unknown>;
  const hydrator: Hydrator = (row) => {
    const obj = make();
    for (const c of columns) {
      const value = row[c.name];
      if (value === undefined) continue;
      obj[c.property] = c.direct && !(c.col.type === "timestamptz" && typeof value === "string") ? value : ds.driver.prepareHydratedValue(value, c.col);
    }
    return obj;
  };
  hydrators.set(meta, hydrator);
  return hydrator;
}

/** Maps raw rows to entities with TypeORM's column metadata and transformers. */
export function hydrate<T extends ObjectLiteral>(ds: DataSource, entity: EntityTarget<T>, rows: Record<string, unknown>[]): T[] {
  const hydrator = hydratorOf(ds, ds.getMetadata(entity));
  return rows.map((row) => hydrator(row) as T);
}

/** SHA-256 hashes, the names of blocks and chunks, are 32 bytes. */
export const HASH_BYTES = 32;

/** Hash `k` of hashes back to back (a view, not a copy). */
export const hashOf = (hashes: Buffer, k: number): Buffer => hashes.subarray(k * HASH_BYTES, (k + 1) * HASH_BYTES);

/** Number `k` of a bytea of int8send() values back to back (big-endian, 8 bytes each; not negative). */
export const int8At = (buf: Buffer, k: number): number => buf.readUInt32BE(k * 8) * 2 ** 32 + buf.readUInt32BE(k * 8 + 4);

/**
 * Hashes as one bytea parameter, back to back, sent in binary; the statement takes
 * them apart with hashAt() or hashArray(). A bytea[] parameter travels as text (two hex
 * digits a byte, quoted), and building those strings for thousands of hashes per
 * statement was the largest garbage of the data path.
 */
export function packedHashes(hashes: Buffer[]): Buffer {
  for (const h of hashes) if (h.length !== HASH_BYTES) throw new Error(`a hash is ${HASH_BYTES} bytes, not ${h.length}`);
  return Buffer.concat(hashes);
}

/** SQL: hash number `n` (from 1) of the packedHashes parameter `param`. */
export const hashAt = (param: string, n: string) => `substring(${param}::bytea FROM (${n}::int - 1) * ${HASH_BYTES} + 1 FOR ${HASH_BYTES})`;

/** SQL: the hashes of the packedHashes parameter `param` as a bytea[], built once per statement (for `= ANY(…)`). */
export const hashArray = (param: string) => `ARRAY(SELECT ${hashAt(param, "g.n")} FROM generate_series(1, length(${param}::bytea) / ${HASH_BYTES}) AS g(n))`;

/**
 * Numbers (or booleans) as one text parameter, "1,2,3", read in the statement with
 * listOf(). pg writes an array parameter as an array literal built up element by
 * element, and V8 keeps those strings in its old generation: on the data path they
 * piled up there until the next full collection.
 */
export const list = (values: readonly (number | boolean)[]): string => values.join(",");

/** SQL: the list() parameter `param` as an array of `type`. */
export const listOf = (param: string, type: "bigint" | "int" | "bool") => `string_to_array(${param}::text, ',')::${type}[]`;
