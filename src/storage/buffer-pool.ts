const MIN_CLASS = 1024 * 1024;

/**
 * Large buffers for the data path, reused from batch to batch. A fresh
 * multi-MiB buffer per batch costs more than its allocation: V8 counts it as
 * external memory and runs a full garbage collection every few dozen MiB of it.
 * Buffers come in power-of-two capacities; only pages that were written count
 * towards resident memory, so a roomy capacity costs nothing.
 */
export class BufferPool {
  private readonly free = new Map<number, ArrayBufferLike[]>();
  /**
   * A plain pool's buffers handed out and not given back. Only these are taken back: never a slice of Node's
   * shared slab (whose other slices other code still uses), never one buffer twice. A shared pool's buffers
   * come back from worker threads as other objects over the same memory, so it checks by capacity alone.
   */
  private readonly out = new WeakSet<ArrayBufferLike>();
  /** Bytes of the idle buffers, over all capacities. */
  private idle = 0;

  /**
   * At most `keep` idle buffers of each capacity are kept, and at most `keepBytes` of idle
   * buffers in all: a buffer given back when they are full takes the room of idle buffers of
   * other capacities (the capacity with the most idle bytes first), so a pool that served many
   * sizes keeps what its latest work uses, not a budget's worth of every size. `shared` buffers are
   * SharedArrayBuffer memory, which worker threads use in place: a call to a worker
   * then moves no buffer, and the main thread gets no new ArrayBuffer back, which V8
   * would count as fresh external memory (see ChunkCodec).
   */
  constructor(
    private readonly keep = 16,
    private readonly shared = false,
    private readonly keepBytes = Infinity,
    /** The smallest capacity (a power of two). */
    private readonly minClass = MIN_CLASS,
  ) {}

  /** A buffer of `size` bytes (contents undefined), the only user of its memory. */
  take(size: number): Buffer {
    const capacity = Math.max(this.minClass, 2 ** Math.ceil(Math.log2(Math.max(1, size))));
    let ab = this.free.get(capacity)?.pop();
    if (ab) this.idle -= capacity;
    else ab = this.shared ? new SharedArrayBuffer(capacity) : Buffer.allocUnsafeSlow(capacity).buffer;
    if (!this.shared) this.out.add(ab);
    return Buffer.from(ab, 0, size);
  }

  /** Returns a buffer from `take` (or its subarray); nothing may use its memory afterwards. Any other buffer is ignored. */
  give(buf: Buffer | null | undefined): void {
    const ab = buf?.buffer;
    if (!ab || !(this.shared ? ab instanceof SharedArrayBuffer : ab instanceof ArrayBuffer) || ab.byteLength < this.minClass || (ab.byteLength & (ab.byteLength - 1)) !== 0) return;
    if (!this.shared && !this.out.delete(ab)) return;
    const capacity = ab.byteLength;
    let list = this.free.get(capacity);
    if (!list) this.free.set(capacity, (list = []));
    if (list.length >= this.keep || (list.length + 1) * capacity > this.keepBytes || (this.shared && list.includes(ab))) return;
    while (this.idle + capacity > this.keepBytes) this.evict(capacity);
    list.push(ab);
    this.idle += capacity;
  }

  /** Drops every idle buffer (their memory goes once nothing else holds it); buffers handed out may still come back. */
  clear(): void {
    this.free.clear();
    this.idle = 0;
  }

  /** Drops an idle buffer of the capacity other than `keep` that holds the most idle bytes. */
  private evict(keep: number): void {
    let most: number | null = null;
    for (const [capacity, list] of this.free) if (capacity !== keep && list.length && (most === null || capacity * list.length > most * this.free.get(most)!.length)) most = capacity;
    this.free.get(most!)!.pop();
    this.idle -= most!;
  }
}
