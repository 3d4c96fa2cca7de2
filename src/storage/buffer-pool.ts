const MIN_CLASS = 1024 * 1024;

/**
 * Large buffers for the data path, reused from batch to batch. A fresh
 * multi-MiB buffer per batch costs more than its allocation: V8 counts it as
 * external memory and runs a full garbage collection every few dozen MiB of it.
 * Buffers come in power-of-two capacities; only pages that were written count
 * towards resident memory, so a roomy capacity costs nothing.
 */
export class BufferPool {
  private readonly free = new Map<number, ArrayBuffer[]>();

  /** At most `keep` idle buffers of each capacity are kept. */
  constructor(private readonly keep = 16) {}

  /** A buffer of `size` bytes (contents undefined), the only user of its memory. */
  take(size: number): Buffer {
    const capacity = Math.max(MIN_CLASS, 2 ** Math.ceil(Math.log2(Math.max(1, size))));
    const ab = this.free.get(capacity)?.pop() ?? (Buffer.allocUnsafeSlow(capacity).buffer as ArrayBuffer);
    return Buffer.from(ab, 0, size);
  }

  /** Returns a buffer from `take` (or its subarray); nothing may use its memory afterwards. */
  give(buf: Buffer | null | undefined): void {
    const ab = buf?.buffer;
    if (!(ab instanceof ArrayBuffer) || ab.byteLength < MIN_CLASS || (ab.byteLength & (ab.byteLength - 1)) !== 0) return;
    let list = this.free.get(ab.byteLength);
    if (!list) this.free.set(ab.byteLength, (list = []));
    if (list.length < this.keep && !list.includes(ab)) list.push(ab);
  }
}
