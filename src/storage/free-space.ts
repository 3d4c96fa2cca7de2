import { noSpace } from "../domain/errors";
import type { BlobStore } from "./blob-store";

/** A file system (or Postgres' disk) that is full: a job fails NO_SPACE, a write is answered 507, and the service goes on once space is free. */
export function isNoSpace(err: unknown): boolean {
  const e = err as { code?: string; driverError?: { code?: string } } | null;
  return e?.code === "ENOSPC" || e?.code === "EDQUOT" || e?.code === "53100" || e?.driverError?.code === "53100";
}

/** How long one measurement of a store's free space is trusted. */
const MEASURE_EVERY_MS = 1000;

const GiB = 2 ** 30;
const size = (n: number) => (n >= GiB ? `${+(n / GiB).toFixed(2)} GiB` : `${+(n / 2 ** 20).toFixed(1)} MiB`);

/**
 * The floor of free space under the blob stores (MIN_FREE_BYTES). Below it new
 * disk writes, uploads and the jobs that write data are refused with NO_SPACE, so
 * that what is running can finish and deletions can free space, instead of every
 * write failing halfway once the file system is full. A store's free space is
 * measured at most once a second however many requests ask; stores that cannot
 * tell (S3) are not guarded.
 */
export class FreeSpace {
  private readonly measured = new Map<BlobStore, { at: number; bytes: Promise<number> }>();

  constructor(
    private readonly stores: BlobStore[],
    /** The floor in bytes; 0 turns the guard off. A field, so that a running service's floor can be moved. */
    public minFreeBytes: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** The least free space among the guarded stores, or null when none can tell. */
  async least(): Promise<number | null> {
    let least: number | null = null;
    for (const store of new Set(this.stores)) {
      if (!store.freeBytes) continue;
      const free = await this.measure(store);
      if (least === null || free < least) least = free;
    }
    return least;
  }

  /** Throws NO_SPACE when a guarded store has less free space than the floor. */
  async check(): Promise<void> {
    if (this.minFreeBytes <= 0) return;
    const free = await this.least();
    if (free !== null && free < this.minFreeBytes) {
      throw noSpace(`the storage has less than ${size(this.minFreeBytes)} free; writes and jobs that write are refused until space is freed (delete backups, images or exports)`);
    }
  }

  private measure(store: BlobStore): Promise<number> {
    const now = this.now();
    const last = this.measured.get(store);
    if (last && now - last.at < MEASURE_EVERY_MS) return last.bytes;
    // Callers within the second share one measurement, even while it is still under way.
    const bytes = store.freeBytes!();
    this.measured.set(store, { at: now, bytes });
    bytes.catch(() => {
      if (this.measured.get(store)?.bytes === bytes) this.measured.delete(store);
    });
    return bytes;
  }
}
