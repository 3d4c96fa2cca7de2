import os from "node:os";
import type { DataSource, EntityManager } from "typeorm";
import { rows } from "../db/sql";
import { processAlive } from "../processes";

/**
 * Intents to write blobs. A writer records a blob's key before it creates the
 * blob and fulfils the intent in the transaction that indexes the blob, so from
 * its first byte to its index row a blob is never unaccounted for: garbage
 * collection leaves pending blobs alone whatever its grace period, even 0.
 * Compaction's segment writes, the volume store's segments and the vault's packs
 * go through here; uploads and exports need not, for their rows exist before
 * their blobs do.
 */

/**
 * An intent whose process is gone (on this host, where that can be told, as
 * the job runner tells it) or that is older than this (or than the grace
 * period, if longer) is taken for one a crashed writer left: its blob becomes
 * garbage like any unindexed blob. A writer still alive then fails at its
 * commit instead of indexing a blob that may be gone.
 */
const ABANDONED_AFTER_MS = 24 * 3600 * 1000;

/** The writing process, as intents name it. */
const OWNER = `${os.hostname()}:${process.pid}`;

type Queryable = DataSource | EntityManager;

/** Records that `key` is about to be written; call before the blob is created. */
export async function intendBlob(q: Queryable, key: string): Promise<void> {
  await q.query(`INSERT INTO pending_blobs (key, owner) VALUES ($1, $2)`, [key, OWNER]);
}

/** In the transaction that indexes the blob: it is no longer pending. Throws when a collector took the intent for abandoned. */
export async function fulfilBlob(em: EntityManager, key: string): Promise<void> {
  const done = await rows(em, fulfilling("$1"), [key]);
  if (!done.length) throw abandoned(key);
}

/**
 * The same as SQL for a statement that indexes the blob in one round trip: a CTE whose one row (the key) says the
 * intent was fulfilled. The statement must write nothing when it has no row, and its caller then throws `abandoned`.
 */
export const fulfilling = (keyParam: string) => `DELETE FROM pending_blobs WHERE key = ${keyParam} RETURNING key`;

/** A collector took the intent for abandoned: the blob may be gone, and must not be indexed. */
export const abandoned = (key: string) => new Error(`blob ${key} was taken for abandoned before it was indexed`);

/** The writes of `keys` were given up (their blobs aborted or never indexed): the blobs are ordinary garbage now. */
export async function dropIntents(q: Queryable, keys: Iterable<string>): Promise<void> {
  const list = [...keys];
  if (list.length) await q.query(`DELETE FROM pending_blobs WHERE key = ANY($1::text[])`, [list]);
}

/**
 * For a collector, before it looks at blobs under `prefix`: forgets the intents
 * crashed writers left (see ABANDONED_AFTER_MS), and returns the keys still
 * pending, whose unfinished files it must keep. A blob that appears later was
 * intended later: check it with INDEXED_OR_PENDING then.
 */
export async function pendingUnder(ds: DataSource, prefix: string, graceMs: number): Promise<Set<string>> {
  const stale = Math.max(graceMs, ABANDONED_AFTER_MS) / 1000;
  await ds.query(`DELETE FROM pending_blobs WHERE starts_with(key, $1) AND created_at < now() - make_interval(secs => $2)`, [prefix, stale]);
  const found = await rows<{ key: string; owner: string }>(ds, `SELECT key, owner FROM pending_blobs WHERE starts_with(key, $1)`, [prefix]);
  const host = os.hostname();
  const dead = new Set<string>();
  for (const r of found) {
    const [h, pid] = r.owner.split(":");
    if (h === host && r.owner !== OWNER && !processAlive(Number(pid))) dead.add(r.owner);
  }
  if (dead.size) await ds.query(`DELETE FROM pending_blobs WHERE starts_with(key, $1) AND owner = ANY($2::text[])`, [prefix, [...dead]]);
  return new Set(found.filter((r) => !dead.has(r.owner)).map((r) => r.key));
}

/**
 * SQL: the blob whose key is `key` is indexed (`indexed`, a query for a row) or
 * still pending, asked in one statement: the writer's commit indexes it and
 * fulfils its intent at once, so one of the two is always seen.
 */
export const INDEXED_OR_PENDING = (indexed: string, key: string) => `SELECT 1 FROM (${indexed}) AS i UNION ALL SELECT 1 FROM pending_blobs WHERE key = ${key}`;
