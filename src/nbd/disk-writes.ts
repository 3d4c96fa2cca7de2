import { BlobNotFoundError } from "../storage/blob-store";
import { BLOCK_SIZE } from "../storage/volume-store";

/** Where a committed block's bytes are. */
export interface StoredBlock {
  index: number;
  segmentId: string;
  offset: number;
}

/** What the write buffer needs of the volume store. */
export interface BlockStore {
  /** The committed blocks of [first, last] that hold data, ascending. */
  refs(diskId: string, first: number, last: number): Promise<StoredBlock[]>;
  /** Fills `into` from a segment's bytes at `offset`; BlobNotFoundError when compaction has deleted it. */
  readRun(diskId: string, segmentId: string, offset: number, into: Buffer): Promise<void>;
  /** Makes blocks durable and the disk's (null: the block reads as zeros), as one write of the disk with changed-block tracking. */
  commit(projectId: string, diskId: string, blocks: [number, Buffer | null][]): Promise<void>;
}

/** Blocks of the block map read and kept at once: 64 MiB of disk per query. */
const REGION_BLOCKS = 1024;
/** Attempts of a read whose segment compaction deleted under it (the map is read again each time). */
const READ_ATTEMPTS = 3;

/** Bytes of acknowledged, uncommitted blocks across every disk of the process; past it, a write waits for its disk's commit. */
export class WriteBudget {
  used = 0;
  constructor(readonly total: number) {}
}

/** One run of blocks for BLOCK_STATUS: `length` bytes from where the last one ended, holding data or not. */
export interface Extent {
  length: number;
  data: boolean;
}

/**
 * The writes of one disk through NBD, in this process. A write lands in whole
 * 64 KiB blocks in memory (a block written in part is first read, so its other
 * bytes stay) and is acknowledged from there: every later read sees it, because
 * every read overlays these blocks on the committed ones. The blocks are
 * committed to the volume store, durably and with changed-block tracking, on
 * FLUSH or FUA, when the disk's share of memory is full, and `delayMs` after the
 * first write of a batch. A block written again before its commit costs nothing
 * more, so a file system rewriting its metadata stores it once per batch.
 *
 * A backup captures the disk through `hold`: everything acknowledged so far is
 * committed and no further commit starts until the capture's transaction is over,
 * so the backup holds exactly the writes acknowledged before its instant.
 */
export class DiskWrites {
  private dirty = new Map<number, Buffer | null>();
  /** The committed block map, a region at a time, as read since the disk last changed. */
  private readonly regions = new Map<number, Promise<Map<number, StoredBlock>>>();
  private committing = new Map<number, Buffer | null>();
  private chain: Promise<void> = Promise.resolve();
  /** Mutations one at a time: a partial block's read and its copy are one step. */
  private mutations: Promise<unknown> = Promise.resolve();
  private holds = 0;
  private released: (() => void)[] = [];
  private timer: NodeJS.Timeout | null = null;
  /** Why the last commit failed; every later request fails until the disk is let go. */
  failure: Error | null = null;
  /** Connections using these writes (the disk's entry goes when the last leaves). */
  users = 0;

  constructor(
    private readonly store: BlockStore,
    readonly projectId: string,
    readonly diskId: string,
    readonly sizeBytes: number,
    private readonly budget: WriteBudget,
    private readonly limits: { diskBytes: number; delayMs: number },
  ) {}

  get pendingBytes(): number {
    return (this.dirty.size + this.committing.size) * BLOCK_SIZE;
  }

  /** Writes `data` at `offset` (a whole request, or the next piece of one: the caller cuts pieces at block boundaries, so a block a request covers whole is never read first). */
  write(offset: number, data: Buffer): Promise<void> {
    return this.mutate(async () => {
      let pos = offset;
      let at = 0;
      while (at < data.length) {
        const index = Math.floor(pos / BLOCK_SIZE);
        const inBlock = pos - index * BLOCK_SIZE;
        const n = Math.min(BLOCK_SIZE - inBlock, data.length - at);
        const block = await this.writable(index, inBlock === 0 && n === BLOCK_SIZE);
        data.copy(block, inBlock, at, at + n);
        pos += n;
        at += n;
      }
    });
  }

  /** Makes [offset, offset + length) read as zeros: whole blocks become holes, the edges of partial ones are zeroed. */
  zero(offset: number, length: number): Promise<void> {
    return this.mutate(async () => {
      let pos = offset;
      const end = offset + length;
      while (pos < end) {
        const index = Math.floor(pos / BLOCK_SIZE);
        const inBlock = pos - index * BLOCK_SIZE;
        const n = Math.min(BLOCK_SIZE - inBlock, end - pos);
        if (n === BLOCK_SIZE) await this.set(index, null);
        else (await this.writable(index, false)).fill(0, inBlock, inBlock + n);
        pos += n;
      }
    });
  }

  /** The bytes [offset, offset + length) as the last acknowledged writes left them. */
  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(offset, buf);
    return buf;
  }

  /** The same into the caller's buffer. */
  async readInto(offset: number, into: Buffer): Promise<void> {
    if (into.length) await this.fill(offset, into, true);
  }

  /** Forgets the block map read so far (the disk changed). */
  invalidate(): void {
    this.regions.clear();
  }

  private region(r: number): Promise<Map<number, StoredBlock>> {
    let map = this.regions.get(r);
    if (!map) {
      const last = Math.min(Math.ceil(this.sizeBytes / BLOCK_SIZE) - 1, (r + 1) * REGION_BLOCKS - 1);
      const loading = this.store.refs(this.diskId, r * REGION_BLOCKS, last).then((refs) => new Map(refs.map((x) => [x.index, x])));
      loading.catch(() => {
        if (this.regions.get(r) === loading) this.regions.delete(r);
      });
      this.regions.set(r, loading);
      map = loading;
    }
    return map;
  }

  /** Fills `into` with the bytes from `offset`: with `overlay`, as acknowledged (uncommitted blocks first), else as committed. */
  private async fill(offset: number, into: Buffer, overlay: boolean): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.fillOnce(offset, into, overlay);
      } catch (err) {
        if (!(err instanceof BlobNotFoundError) || attempt >= READ_ATTEMPTS) throw err;
        this.invalidate();
      }
    }
  }

  /** One range read per run of adjacent blocks in one segment, only the bytes asked for. */
  private async fillOnce(offset: number, into: Buffer, overlay: boolean): Promise<void> {
    const end = offset + into.length;
    const first = Math.floor(offset / BLOCK_SIZE);
    const last = Math.floor((end - 1) / BLOCK_SIZE);
    // The uncommitted blocks as they are now: a commit that ends during the read has put
    // the same bytes in the store, so laying these over what it reads stays right.
    let pending: Map<number, Buffer | null> | null = null;
    if (overlay && (this.dirty.size || this.committing.size)) {
      pending = new Map();
      for (let i = first; i <= last; i++) {
        const b = this.dirty.has(i) ? this.dirty.get(i)! : this.committing.get(i);
        if (b !== undefined) pending.set(i, b);
      }
    }
    const reads: Promise<void>[] = [];
    const span = (i: number) => [Math.max(offset, i * BLOCK_SIZE), Math.min(end, (i + 1) * BLOCK_SIZE)];
    let i = first;
    while (i <= last) {
      const [from, to] = span(i);
      const mine = pending?.get(i);
      if (mine !== undefined) {
        if (mine) mine.copy(into, from - offset, from - i * BLOCK_SIZE, to - i * BLOCK_SIZE);
        else into.fill(0, from - offset, to - offset);
        i++;
        continue;
      }
      const ref = (await this.region(Math.floor(i / REGION_BLOCKS))).get(i);
      if (!ref) {
        into.fill(0, from - offset, to - offset);
        i++;
        continue;
      }
      let j = i;
      while (j < last && pending?.get(j + 1) === undefined) {
        const next = (await this.region(Math.floor((j + 1) / REGION_BLOCKS))).get(j + 1);
        if (!next || next.segmentId !== ref.segmentId || next.offset !== ref.offset + (j + 1 - i) * BLOCK_SIZE) break;
        j++;
      }
      const runEnd = span(j)[1];
      reads.push(this.store.readRun(this.diskId, ref.segmentId, ref.offset + (from - i * BLOCK_SIZE), into.subarray(from - offset, runEnd - offset)));
      i = j + 1;
    }
    await Promise.all(reads);
  }

  /** Where [offset, offset + length) holds data, in runs of whole blocks (the first starts at `offset`); the work grows with the blocks that hold data, not with the length. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    const first = Math.floor(offset / BLOCK_SIZE);
    const last = Math.floor((end - 1) / BLOCK_SIZE);
    const data = new Set((await this.store.refs(this.diskId, first, last)).map((r) => r.index));
    for (const m of [this.committing, this.dirty]) {
      for (const [i, b] of m) {
        if (i < first || i > last) continue;
        if (b) data.add(i);
        else data.delete(i);
      }
    }
    const out: Extent[] = [];
    let at = offset;
    const push = (to: number, isData: boolean) => {
      if (to <= at) return;
      const lastRun = out[out.length - 1];
      if (lastRun && lastRun.data === isData) lastRun.length += to - at;
      else out.push({ length: to - at, data: isData });
      at = to;
    };
    for (const i of [...data].sort((x, y) => x - y)) {
      push(Math.max(offset, i * BLOCK_SIZE), false);
      push(Math.min(end, (i + 1) * BLOCK_SIZE), true);
    }
    push(end, false);
    return out;
  }

  /** Commits everything acknowledged before the call; resolves once it is durable. */
  flush(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    return this.enqueue(false);
  }

  /**
   * Runs `capture` at an instant between writes: every write acknowledged before it
   * is committed first, and none acknowledged after it is committed until it ends.
   */
  async hold<T>(capture: () => Promise<T>): Promise<T> {
    this.holds++;
    try {
      await this.enqueue(true);
      return await capture();
    } finally {
      this.holds--;
      if (this.holds === 0) for (const r of this.released.splice(0)) r();
    }
  }

  /** Drops the timer; what is still buffered is committed by the last `flush`. */
  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
  }

  private mutate(fn: () => Promise<void>): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const run = this.mutations.then(fn);
    this.mutations = run.catch(() => undefined);
    return run;
  }

  /** The uncommitted buffer of block `index`, made from its current bytes unless the caller overwrites all of it. */
  private async writable(index: number, whole: boolean): Promise<Buffer> {
    const mine = this.dirty.get(index);
    if (mine) return mine;
    let block: Buffer;
    if (whole) block = Buffer.allocUnsafe(BLOCK_SIZE);
    else if (mine === null) block = Buffer.alloc(BLOCK_SIZE);
    else {
      const before = this.committing.get(index);
      if (before !== undefined) block = before ? Buffer.from(before) : Buffer.alloc(BLOCK_SIZE);
      else {
        block = Buffer.allocUnsafe(BLOCK_SIZE);
        await this.fill(index * BLOCK_SIZE, block, false);
      }
    }
    await this.set(index, block);
    return block;
  }

  private async set(index: number, block: Buffer | null): Promise<void> {
    if (!this.dirty.has(index)) {
      while ((this.dirty.size + 1) * BLOCK_SIZE > this.limits.diskBytes || (this.budget.used >= this.budget.total && this.dirty.size > 0)) {
        await this.enqueue(false);
        if (this.failure) throw this.failure;
      }
      this.budget.used += BLOCK_SIZE;
    }
    this.dirty.set(index, block);
    if (!this.timer) {
      this.timer = setTimeout(() => {
        this.timer = null;
        this.enqueue(false).catch(() => undefined); // the failure is kept and answers the next request
      }, this.limits.delayMs);
      this.timer.unref();
    }
  }

  /**
   * Queues a commit. One asked for while a capture holds the disk waits for the hold to
   * end before it joins the queue: inside the queue it would stand in front of the
   * capture's own commit and wait for it, which waits for the hold to end.
   */
  private async enqueue(forced: boolean): Promise<void> {
    if (!forced) while (this.holds > 0) await new Promise<void>((r) => this.released.push(r));
    const run = this.chain.then(() => this.commitOnce());
    this.chain = run.catch(() => undefined);
    return run;
  }

  private async commitOnce(): Promise<void> {
    if (this.dirty.size === 0) return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.committing = this.dirty;
    this.dirty = new Map();
    const blocks = [...this.committing].sort((a, b) => a[0] - b[0]);
    try {
      await this.store.commit(this.projectId, this.diskId, blocks);
      // The block map read before this commit is stale now (the volume store also says so, for every writer).
      this.invalidate();
      this.budget.used -= this.committing.size * BLOCK_SIZE;
    } catch (err) {
      // Keep the bytes (newer writes win) so reads stay right, and fail what comes next.
      for (const [i, b] of this.dirty) this.committing.set(i, b);
      this.budget.used -= (blocks.length + this.dirty.size - this.committing.size) * BLOCK_SIZE;
      this.dirty = this.committing;
      this.failure ??= err as Error;
      throw err;
    } finally {
      this.committing = new Map();
    }
  }
}
