import { performance } from "node:perf_hooks";

/** Largest read that may run synchronously: a block of a disk, which the page cache serves in a few microseconds. */
export const SYNC_READ_BYTES = 64 * 1024;
/** A synchronous read (or open) slower than this was served by the device, not by the page cache. */
const SLOW_MS = 0.05;
/** Reads watched together; SLOW_IN_WINDOW slow ones among them send reads to the thread pool. */
const WINDOW = 64;
const SLOW_IN_WINDOW = 4;
/** How long reads then stay in the thread pool before a few are tried synchronously again. */
const PAUSE_MS = 1000;

/**
 * Whether small reads of files run synchronously on the event loop, as their
 * calls measure them.
 *
 * A read the page cache holds is a system call of a microsecond or two. Handed
 * to libuv's thread pool, the same read costs the event loop far more: a queue,
 * a wake-up of a pool thread and a completion, some 25 µs on a busy two-core
 * machine, which bounded a disk's random reads over NBD. A read the device must
 * serve would instead hold the event loop for the device's latency, and a cold
 * disk's reads overlap only in the pool.
 *
 * So small reads run synchronously while they are fast. Once SLOW_IN_WINDOW of
 * the last WINDOW took longer than SLOW_MS, the reads of the next PAUSE_MS go to
 * the pool, then a few are tried synchronously again. A thread the scheduler
 * preempts in the middle of a read makes that one read slow, rarely four of 64;
 * a read from the device is slow every time.
 */
export class SyncReads {
  private seen = 0;
  private slow = 0;
  private pausedUntil = 0;

  constructor(private readonly now: () => number = () => performance.now()) {}

  /** Whether a read may run synchronously now. */
  allowed(): boolean {
    if (this.pausedUntil === 0) return true;
    if (this.now() < this.pausedUntil) return false;
    this.pausedUntil = 0;
    return true;
  }

  /** Runs `fn` (a synchronous read or open) and learns from how long it took. */
  run<T>(fn: () => T): T {
    const start = this.now();
    try {
      return fn();
    } finally {
      this.took(this.now() - start);
    }
  }

  private took(ms: number): void {
    if (ms > SLOW_MS && ++this.slow >= SLOW_IN_WINDOW) {
      this.pausedUntil = this.now() + PAUSE_MS;
      this.seen = this.slow = 0;
      return;
    }
    if (++this.seen >= WINDOW) this.seen = this.slow = 0;
  }
}
