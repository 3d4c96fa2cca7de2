import type { DataSource, EntityManager } from "typeorm";

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
