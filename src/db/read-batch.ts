import type { DataSource } from "typeorm";
import { readRows } from "./sql";

/** Reads rows: a statement and its values. */
export type Read = (text: string, values: unknown[]) => Promise<Record<string, unknown>[]>;

interface Pending {
  text: string;
  values: unknown[];
  resolve(rows: Record<string, unknown>[]): void;
  reject(err: unknown): void;
}

/**
 * Reads asked for in the same tick (the lists and rows one level of a query needs,
 * each already batched over its parents by a DataLoader) go to Postgres as one
 * statement: each read becomes a branch of a UNION ALL that turns its rows into JSON,
 * numbered so the rows go back to the read that asked for them, in its own order (an
 * Append returns its branches one after the other, each as its subquery ordered it).
 * Placeholders are renumbered after the values of the branches before. A lone read
 * goes as it is. JSON rows hold timestamps as ISO text and bigints as numbers, which
 * hydration reads as it reads them from a plain row.
 */
export function batchedReads(ds: DataSource): Read {
  let pending: Pending[] = [];

  async function flush(): Promise<void> {
    const batch = pending;
    pending = [];
    if (batch.length === 1) {
      const [only] = batch;
      readRows(ds, only.text, only.values).then(only.resolve, only.reject);
      return;
    }
    const values: unknown[] = [];
    const branches = batch.map((read, i) => {
      const text = read.text.replace(/\$(\d+)/g, (_, n: string) => `$${Number(n) + values.length}`);
      values.push(...read.values);
      return `SELECT ${i} AS "__read", to_json(r) AS "__row" FROM (${text}) r`;
    });
    try {
      const rows = (await readRows(ds, branches.join("\nUNION ALL\n"), values)) as { __read: number; __row: Record<string, unknown> }[];
      const out: Record<string, unknown>[][] = batch.map(() => []);
      for (const row of rows) out[row.__read].push(row.__row);
      batch.forEach((read, i) => read.resolve(out[i]));
    } catch (err) {
      for (const read of batch) read.reject(err);
    }
  }

  return (text, values) =>
    new Promise((resolve, reject) => {
      pending.push({ text, values, resolve, reject });
      // DataLoaders dispatch their batches on process.nextTick; this runs after every batch of this tick.
      if (pending.length === 1) process.nextTick(() => void flush());
    });
}
