import { BlobNotFoundError } from "../storage/blob-store";
import { BufferPool } from "../storage/buffer-pool";
import { BLOCK_SIZE } from "../storage/volume-store";
import { decodeRecords, encodeRecords, type JournalRecord, type WriteJournal } from "./journal";

/** Where a committed block's bytes are: in a segment of the disk, or (segmentId null: a clone's source block) in the vault, named by `hash`. */
export interface StoredBlock {
  index: number;
  segmentId: string | null;
  offset: number;
  hash?: Buffer;
}

/** What the write buffer needs of the volume store. */
export interface BlockStore {
  /** The committed blocks of [first, last] that hold data, ascending. */
  refs(diskId: string, first: number, last: number): Promise<StoredBlock[]>;
  /** Fills `into` from a segment's bytes at `offset`; BlobNotFoundError when compaction has deleted it. */
  readRun(diskId: string, segmentId: string, offset: number, into: Buffer): Promise<void>;
  /** The bytes of chunks of the project's vault (a clone's blocks it has not written), in order; copied out of, never into. `ahead`: read them too, for the reads that come next. */
  readVault(projectId: string, hashes: Buffer[], ahead?: Buffer[]): Promise<Buffer[]>;
  /** How many restores the disk has had (null: it is gone). */
  restores(projectId: string, diskId: string): Promise<number | null>;
  /**
   * Makes blocks durable and the disk's (null: the block reads as zeros), as one write of the disk with
   * changed-block tracking, and deletes the disk's journal rows up to `journalUpTo` in the same transaction.
   * Refuses when the disk has had another restore than `restores` (the writes were made to bytes it
   * replaced), is gone or is not writable. Resolves with where the blocks that hold data are now. The blocks
   * may be stored at once, but are the disk's only after `after` (the commit before) has ended; its failure fails this one.
   */
  commit(projectId: string, diskId: string, blocks: [number, Buffer | null][], opts: { journalUpTo: number; restores: number | null; source: object; after: Promise<unknown> }): Promise<StoredBlock[]>;
}

/** Blocks of the block map read and kept at once: 64 MiB of disk per query. */
const REGION_BLOCKS = 1024;
/** Blocks of a clone's source read ahead of a sequential reader (4 MiB): the next requests find them decompressed. */
const READ_AHEAD_BLOCKS = 64;
/** Attempts of a read whose segment compaction deleted under it (the map is read again each time). */
const READ_ATTEMPTS = 3;
/** Bytes of writes kept for the journal between two FLUSHes; past it the next FLUSH commits the blocks instead (a bulk copy is written once). */
const JOURNAL_FLUSH_BYTES = 8 * 1024 * 1024;
/** Journal rows applied per query when a disk's writes start. */
const REPLAY_ROWS = 64;

/**
 * What an uncommitted block costs of the write budget: its buffer, or for a block that reads as zeros (TRIM,
 * WRITE_ZEROES) about what its map entry takes. Counted as a whole block, a discard of a whole disk (what
 * `mkfs` does first) made a commit per 256 blocks, and the holes of a sparse image took a third of every batch.
 */
const ZERO_COST = 64;
const cost = (block: Buffer | null) => (block ? BLOCK_SIZE : ZERO_COST);

/**
 * Bytes of acknowledged, uncommitted blocks across every disk of the process; past it, a write waits for its disk's commit.
 * The block buffers are reused: a committed block's buffer goes back to `blocks` for the next write. A fresh 64 KiB
 * buffer per written block is memory the C library hands out between the socket's buffers and keeps when it is
 * freed, so a day of writes grew the process by far more than the budget.
 */
export class WriteBudget {
  used = 0;
  readonly blocks: BufferPool;
  constructor(readonly total: number) {
    this.blocks = new BufferPool(Infinity, false, total, BLOCK_SIZE);
  }
}

/** A block buffer waiting for its earlier bytes: `written` holds [from, to) pairs of what was written into it meanwhile. */
interface Unfilled {
  block: Buffer;
  written: number[];
  done: Promise<void>;
}

/** One run of blocks for BLOCK_STATUS: `length` bytes from where the last one ended, holding data or not. */
export interface Extent {
  length: number;
  data: boolean;
}

/** The runs of [offset, end) for BLOCK_STATUS, given the blocks holding data in it, ascending. */
export function extentsOf(offset: number, end: number, dataBlocks: Iterable<number>): Extent[] {
  const out: Extent[] = [];
  let at = offset;
  const push = (to: number, isData: boolean) => {
    if (to <= at) return;
    const lastRun = out[out.length - 1];
    if (lastRun && lastRun.data === isData) lastRun.length += to - at;
    else out.push({ length: to - at, data: isData });
    at = to;
  };
  for (const i of dataBlocks) {
    push(Math.max(offset, i * BLOCK_SIZE), false);
    push(Math.min(end, (i + 1) * BLOCK_SIZE), true);
  }
  push(end, false);
  return out;
}

/**
 * The writes of one disk through NBD, in this process. A write lands in whole
 * 64 KiB blocks in memory (a block written in part is first read, so its other
 * bytes stay) and is acknowledged from there: every later read sees it, because
 * every read overlays these blocks on the committed ones. The blocks are
 * committed to the volume store, durably and with changed-block tracking, when
 * the disk's share of memory is full, `delayMs` after the first write of a batch,
 * and when the last connection leaves. A block written again before its commit
 * costs nothing more, so a file system rewriting its metadata stores it once per batch.
 *
 * FLUSH and FUA make what was acknowledged durable. With a journal (the process
 * owns the disk's), a FLUSH appends the writes since the last one, as they came,
 * to it: a file system's few KiB of metadata cost a few KiB, where a commit writes
 * whole blocks, a segment and the block map. Past JOURNAL_FLUSH_BYTES of writes
 * between two FLUSHes (a bulk copy), or without a journal, a FLUSH commits.
 *
 * A backup captures the disk through `hold`: everything acknowledged so far is
 * committed and no further commit starts until the capture's transaction is over,
 * so the backup holds exactly the writes acknowledged before its instant.
 */
export class DiskWrites {
  private dirty = new Map<number, Buffer | null>();
  /** What the uncommitted blocks cost of the write budget (see `cost`). */
  private dirtyBytes = 0;
  /** The committed block map, a region at a time, as read since the disk last changed. */
  private readonly regions = new Map<number, Promise<Map<number, StoredBlock>>>();
  /** The same regions once read. */
  private readonly loaded = new Map<number, Map<number, StoredBlock>>();
  /** The blocks of the commits under way, oldest first (two at most: one indexing its segment, one writing the next). */
  private committing: Map<number, Buffer | null>[] = [];
  /**
   * Blocks written in part whose other bytes are still being read: the write is taken at once
   * (a 4 KiB write costs no 64 KiB read on its way), and the block's earlier bytes fill in
   * around what was written when they arrive. Reads and commits of such a block wait for it.
   */
  private readonly unfilled = new Map<number, Unfilled>();
  private chain: Promise<void> = Promise.resolve();
  /** Mutations one at a time: a partial block's read and its copy are one step. */
  private mutations: Promise<unknown> = Promise.resolve();
  private holds = 0;
  private released: (() => void)[] = [];
  private timer: NodeJS.Timeout | null = null;
  /** The last commit queued, until it takes the blocks; and who waits for room (a commit took blocks, or ended). */
  private queued: Promise<void> | null = null;
  private room: (() => void)[] = [];
  /** The end of the last commit started: the next one indexes its blocks after it. */
  private lastEnd: Promise<void> = Promise.resolve();
  private journal: WriteJournal | null = null;
  /** Writes acknowledged since the journal's last append, as they came (copies). */
  private log: JournalRecord[] = [];
  private logBytes = 0;
  /** Writes were acknowledged since the last append that no record holds: until a commit takes them, a FLUSH commits. */
  private logOverflow = false;
  /** The last journal row started, and the last a commit (under way or done) deletes. */
  private seq = 0;
  private takenSeq = 0;
  /** Journal appends in order: a commit waits for those it covers before deleting them. */
  private appending: Promise<void> = Promise.resolve();
  /** The next append, not started yet: a FLUSH that comes meanwhile waits for it rather than making a row of its own. */
  private joining: Promise<void> | null = null;
  /** The commit under way that takes writes no journal row holds (a FLUSH waits for it). */
  private covering: Promise<void> | null = null;
  /** The restores the disk had when its writes started here (null: not known, the writes never started). */
  private restores: number | null = null;
  /** The disk's writes start once what its journal held is applied; every request waits for it. */
  private ready: Promise<void> = Promise.resolve();
  /** Whether `ready` has settled: a read then need not wait a turn for it. */
  private started = true;
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

  /**
   * Starts the disk's writes: with `journal` (null when another process owns the disk's
   * journal, or none is kept), what an earlier owner left in it is applied and committed
   * first. Requests made meanwhile wait; a failure here fails them.
   */
  start(journal: Promise<WriteJournal | null>): Promise<void> {
    this.started = false;
    this.ready = journal.then(async (j) => {
      this.restores = await this.store.restores(this.projectId, this.diskId);
      this.journal = j;
      if (j) await this.replay(j);
    });
    this.ready = this.ready
      .catch((err: Error) => {
        this.failure ??= err;
      })
      .finally(() => (this.started = true));
    this.mutations = this.ready;
    return this.ready;
  }

  private async replay(journal: WriteJournal): Promise<void> {
    for (;;) {
      const rows = await journal.rows(this.diskId, this.seq, REPLAY_ROWS);
      if (!rows.length) break;
      for (const row of rows) {
        for (const r of decodeRecords(row.records)) {
          if (r.offset + r.length > this.sizeBytes) throw new Error(`the journal holds a write past the end of the ${this.sizeBytes}-byte disk`);
          if (r.data) await this.put(r.offset, [r.data]);
          else await this.clear(r.offset, r.length);
        }
        // A commit that the disk's share of memory forces meanwhile covers the rows applied whole.
        this.seq = row.seq;
      }
    }
    await this.commitNow();
  }

  /**
   * Writes `data` (one buffer, or pieces back to back) at `offset`: a whole request, or the next part of one. The
   * caller cuts parts at block boundaries, so a block a request covers whole is never read first.
   */
  write(offset: number, data: Buffer | readonly Buffer[]): Promise<void> {
    const pieces = Buffer.isBuffer(data) ? [data] : data;
    return this.mutate(async () => {
      const length = await this.put(offset, pieces);
      this.note(offset, length, pieces);
    });
  }

  /** Makes [offset, offset + length) read as zeros: whole blocks become holes, the edges of partial ones are zeroed. */
  zero(offset: number, length: number): Promise<void> {
    return this.mutate(async () => {
      await this.clear(offset, length);
      this.note(offset, length, null);
    });
  }

  /** Copies `pieces` into the blocks from `offset`; resolves with their length. */
  private async put(offset: number, pieces: readonly Buffer[]): Promise<number> {
    let length = 0;
    for (const p of pieces) length += p.length;
    const end = offset + length;
    let pos = offset;
    /** The next byte to copy: pieces[p] at pAt. */
    let p = 0;
    let pAt = 0;
    while (pos < end) {
      const index = Math.floor(pos / BLOCK_SIZE);
      const inBlock = pos - index * BLOCK_SIZE;
      const n = Math.min(BLOCK_SIZE - inBlock, end - pos);
      const block = await this.writable(index, inBlock === 0 && n === BLOCK_SIZE);
      for (let k = 0; k < n;) {
        const piece = pieces[p];
        const m = Math.min(n - k, piece.length - pAt);
        piece.copy(block, inBlock + k, pAt, pAt + m);
        k += m;
        pAt += m;
        if (pAt === piece.length) {
          p++;
          pAt = 0;
        }
      }
      this.unfilled.get(index)?.written.push(inBlock, inBlock + n);
      pos += n;
    }
    return length;
  }

  /**
   * Zeros [offset, offset + length). A whole block that holds no data already reads as zeros and is left alone,
   * so a discard of a whole disk (what `mkfs` does first) costs what the disk holds, not its size: one read of
   * the block map for the range, and an entry per block that held data.
   */
  private async clear(offset: number, length: number): Promise<void> {
    let pos = offset;
    const end = offset + length;
    const first = Math.ceil(offset / BLOCK_SIZE);
    const last = Math.floor(end / BLOCK_SIZE) - 1;
    const holding = new Set<number>();
    if (last >= first) {
      // Blocks pending now may be committed while the map is read: they count as holding data. Nothing else
      // becomes pending meanwhile (writes wait for this one), so the set is the whole answer.
      for (const m of [...this.committing, this.dirty]) for (const [i, b] of m) if (b && i >= first && i <= last) holding.add(i);
      for (const r of await this.store.refs(this.diskId, first, last)) holding.add(r.index);
    }
    while (pos < end) {
      const index = Math.floor(pos / BLOCK_SIZE);
      const inBlock = pos - index * BLOCK_SIZE;
      const n = Math.min(BLOCK_SIZE - inBlock, end - pos);
      if (n === BLOCK_SIZE) {
        if (holding.has(index)) await this.set(index, null);
      } else {
        (await this.writable(index, false)).fill(0, inBlock, inBlock + n);
        this.unfilled.get(index)?.written.push(inBlock, inBlock + n);
      }
      pos += n;
    }
  }

  /**
   * Keeps an applied write (`data` null: zeros) for the next FLUSH's journal row, within JOURNAL_FLUSH_BYTES: a
   * record per piece. A piece that is most of its own memory (what the socket read) is kept as it is, nobody
   * writes into it; a small slice of a larger buffer is copied, so it does not keep the rest alive. A bulk copy
   * without FLUSHes overflows the journal again after every commit: copying what it kept cost a tenth of a
   * sequential write's CPU and a share of its garbage collections.
   */
  private note(offset: number, length: number, data: readonly Buffer[] | null): void {
    if (!this.journal || this.logOverflow) return;
    const bytes = data ? length : 0;
    if (this.logBytes + bytes > Math.min(JOURNAL_FLUSH_BYTES, this.limits.diskBytes)) {
      this.logOverflow = true;
      this.log = [];
      this.logBytes = 0;
      return;
    }
    if (!data) this.log.push({ offset, length, data: null });
    else {
      let at = offset;
      for (const piece of data) {
        const own = piece.length * 2 >= piece.buffer.byteLength;
        this.log.push({ offset: at, length: piece.length, data: own ? piece : Buffer.from(piece) });
        at += piece.length;
      }
    }
    this.logBytes += bytes;
  }

  /** The bytes [offset, offset + length) as the last acknowledged writes left them. */
  async read(offset: number, length: number): Promise<Buffer> {
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(offset, buf);
    return buf;
  }

  /** The same into the caller's buffer. */
  async readInto(offset: number, into: Buffer): Promise<void> {
    if (!this.started) await this.ready;
    if (this.failure) throw this.failure;
    if (into.length) await this.fill(offset, into, true);
  }

  /** Forgets the block map read so far (the disk changed elsewhere; a commit of these writes patches it instead). */
  invalidate(): void {
    this.regions.clear();
    this.loaded.clear();
  }

  /** Points the kept block map at where a commit of these writes put `blocks` (the rest of them read as zeros now). */
  private patch(blocks: [number, Buffer | null][], stored: StoredBlock[]): void {
    const at = new Map(stored.map((s) => [s.index, s]));
    for (const [index] of blocks) {
      const r = Math.floor(index / REGION_BLOCKS);
      const region = this.loaded.get(r);
      if (!region) {
        // Not read, or still loading (it may hold what was there before): read again when next needed.
        this.regions.delete(r);
        continue;
      }
      const ref = at.get(index);
      if (ref) region.set(index, ref);
      else region.delete(index);
    }
  }

  /** Region `r` of the block map: at once when it is loaded, else once read. */
  private regionNow(r: number): Map<number, StoredBlock> | Promise<Map<number, StoredBlock>> {
    return this.loaded.get(r) ?? this.region(r);
  }

  private region(r: number): Promise<Map<number, StoredBlock>> {
    let map = this.regions.get(r);
    if (!map) {
      const last = Math.min(Math.ceil(this.sizeBytes / BLOCK_SIZE) - 1, (r + 1) * REGION_BLOCKS - 1);
      const loading = this.store.refs(this.diskId, r * REGION_BLOCKS, last).then((refs) => {
        const region = new Map(refs.map((x) => [x.index, x]));
        if (this.regions.get(r) === loading) this.loaded.set(r, region);
        return region;
      });
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
    // An uncommitted block is looked up when its turn comes and copied at once: its buffer goes back to the
    // pool when its commit ends. A block not pending then is in the block map (a commit that ended before
    // has patched it, or dropped the region), or is written later, which a read running beside the write
    // may or may not see.
    const pending = (i: number): Buffer | null | undefined => {
      if (!overlay) return undefined;
      const b = this.dirty.get(i);
      return b !== undefined ? b : this.committed(i);
    };
    const reads: Promise<void>[] = [];
    /** A clone's blocks read from its source, in the vault: one read for all of them. */
    const inVault: number[] = [];
    const hashes: Buffer[] = [];
    const span = (i: number) => [Math.max(offset, i * BLOCK_SIZE), Math.min(end, (i + 1) * BLOCK_SIZE)];
    let i = first;
    while (i <= last) {
      const [from, to] = span(i);
      const mine = pending(i);
      if (mine !== undefined) {
        if (mine && this.unfilled.get(i)?.block === mine) {
          await this.filled(i, mine);
          continue; // look again: the block may have been committed meanwhile
        }
        if (mine) mine.copy(into, from - offset, from - i * BLOCK_SIZE, to - i * BLOCK_SIZE);
        else into.fill(0, from - offset, to - offset);
        i++;
        continue;
      }
      let map = this.regionNow(Math.floor(i / REGION_BLOCKS));
      if (!(map instanceof Map)) map = await map;
      const ref = map.get(i);
      if (!ref) {
        into.fill(0, from - offset, to - offset);
        i++;
        continue;
      }
      if (ref.segmentId === null) {
        inVault.push(i);
        hashes.push(ref.hash!);
        i++;
        continue;
      }
      let j = i;
      while (j < last && pending(j + 1) === undefined) {
        let around = this.regionNow(Math.floor((j + 1) / REGION_BLOCKS));
        if (!(around instanceof Map)) around = await around;
        const next = around.get(j + 1);
        if (!next || next.segmentId !== ref.segmentId || next.offset !== ref.offset + (j + 1 - i) * BLOCK_SIZE) break;
        j++;
      }
      const runEnd = span(j)[1];
      reads.push(this.store.readRun(this.diskId, ref.segmentId, ref.offset + (from - i * BLOCK_SIZE), into.subarray(from - offset, runEnd - offset)));
      i = j + 1;
    }
    if (hashes.length) {
      // A read of several blocks is a sequential reader's: the source's next blocks come in the same go.
      const ahead: Buffer[] = [];
      if (last > first) {
        for (let k = last + 1; k <= last + READ_AHEAD_BLOCKS; k++) {
          const ref = this.loaded.get(Math.floor(k / REGION_BLOCKS))?.get(k);
          if (ref && ref.segmentId === null) ahead.push(ref.hash!);
        }
      }
      reads.push(
        this.store.readVault(this.projectId, hashes, ahead).then((blocks) => {
          for (let k = 0; k < inVault.length; k++) {
            const [from, to] = span(inVault[k]);
            blocks[k].copy(into, from - offset, from - inVault[k] * BLOCK_SIZE, to - inVault[k] * BLOCK_SIZE);
          }
        }),
      );
    }
    if (reads.length === 1) await reads[0];
    else if (reads.length) await Promise.all(reads);
  }

  /** Where [offset, offset + length) holds data, in runs of whole blocks (the first starts at `offset`); the work grows with the blocks that hold data, not with the length. */
  async extents(offset: number, length: number): Promise<Extent[]> {
    await this.ready;
    if (this.failure) throw this.failure;
    const end = offset + length;
    const first = Math.floor(offset / BLOCK_SIZE);
    const last = Math.floor((end - 1) / BLOCK_SIZE);
    const data = new Set((await this.store.refs(this.diskId, first, last)).map((r) => r.index));
    for (const m of [...this.committing, this.dirty]) {
      for (const [i, b] of m) {
        if (i < first || i > last) continue;
        if (b) data.add(i);
        else data.delete(i);
      }
    }
    return extentsOf(
      offset,
      end,
      [...data].sort((x, y) => x - y),
    );
  }

  /** Makes everything acknowledged before the call durable: in the journal, or committed. */
  async flush(): Promise<void> {
    await this.ready;
    if (this.failure) throw this.failure;
    if (!this.journal || this.logOverflow) return this.enqueue(false);
    const covering = this.covering;
    await (this.joining ??= this.append());
    if (covering) await covering;
    if (this.failure) throw this.failure;
  }

  /**
   * Once the appends before it have ended, appends what was acknowledged until then as one row: the FLUSHes that
   * came while those ran share it (a guest flushing from several queues, or `fio` at depth 16 with a FLUSH about
   * every fifth write, pays one Postgres commit for them all). Resolves once that is durable, in the journal or
   * (the journal failed or overflowed meanwhile) by a commit.
   */
  private append(): Promise<void> {
    let commit = false;
    const appended = this.appending.then(async () => {
      this.joining = null;
      const journal = this.journal;
      if (!journal || this.logOverflow) {
        commit = true;
        return;
      }
      const records = this.log;
      this.log = [];
      this.logBytes = 0;
      if (!records.length) return;
      try {
        await journal.append(this.diskId, ++this.seq, encodeRecords(records));
      } catch {
        // The journal did not take them (they may or may not be in it): a commit makes them durable all the same, and
        // journaling stops, so no later row lands after one that may be missing.
        this.journal = null;
        commit = true;
      }
    });
    // A commit waits for the appends before it, but not for the commit one of them falls back to.
    this.appending = appended.catch(() => undefined);
    return appended.then(() => (commit ? this.enqueue(false) : undefined));
  }

  /** From now on a FLUSH commits (the journal is no longer this process's); rows already appended go with the next commit. */
  stopJournaling(): void {
    this.journal = null;
  }

  /** Commits everything acknowledged before the call into the disk's blocks (the last connection leaves, or the journal is drained). */
  async commitNow(): Promise<void> {
    if (this.failure) throw this.failure;
    return this.enqueue(false);
  }

  /**
   * Runs `capture` at an instant between writes: every write acknowledged before it
   * is committed first, and none acknowledged after it is committed until it ends.
   */
  async hold<T>(capture: () => Promise<T>): Promise<T> {
    await this.ready;
    this.holds++;
    try {
      await this.enqueue(true);
      return await capture();
    } finally {
      this.holds--;
      if (this.holds === 0) for (const r of this.released.splice(0)) r();
    }
  }

  /**
   * Drops the timer; what is still buffered is committed by the last `commitNow`. After a failure
   * no commit takes the blocks left, pending or in the commits that failed: once those commits
   * have ended, their memory goes back to the process's write budget and its pool (nobody reads
   * them once the last connection has left), or every failed disk would hold some of it until
   * the process ends.
   */
  stop(): Promise<void> {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const giveBack = () => {
      if (!this.failure) return;
      for (const blocks of [this.dirty, ...this.committing]) {
        for (const [index, b] of blocks) {
          this.budget.used -= cost(b);
          this.drop(index, b); // once no fill writes into it
        }
      }
      this.dirty = new Map();
      this.dirtyBytes = 0;
      this.committing = [];
    };
    return this.lastEnd.then(giveBack, giveBack);
  }

  private mutate(fn: () => Promise<void>): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const run = this.mutations.then(() => {
      if (this.failure) throw this.failure;
      return fn();
    });
    this.mutations = run.catch(() => undefined);
    return run;
  }

  /** The uncommitted buffer of block `index`, made from its current bytes unless the caller overwrites all of it. */
  private async writable(index: number, whole: boolean): Promise<Buffer> {
    const mine = this.dirty.get(index);
    if (mine) return mine;
    const pool = this.budget.blocks;
    let block: Buffer;
    let base: Buffer | null = null;
    if (whole) block = pool.take(BLOCK_SIZE);
    else if (mine === null) block = pool.take(BLOCK_SIZE).fill(0);
    else {
      let before = this.committed(index);
      while (before && this.unfilled.get(index)?.block === before) {
        await this.filled(index, before);
        before = this.committed(index); // its commit may have ended meanwhile (and its buffer gone back)
      }
      block = pool.take(BLOCK_SIZE);
      if (before) before.copy(block);
      else if (before === null) block.fill(0);
      else base = pool.take(BLOCK_SIZE);
    }
    await this.set(index, block);
    if (base) this.fillIn(index, block, base);
    return block;
  }

  /** Gives a block's buffer back to the pool once nothing fills it any more. */
  private drop(index: number, block: Buffer | null | undefined): void {
    if (!block) return;
    const entry = this.unfilled.get(index);
    const pool = this.budget.blocks;
    if (entry?.block === block)
      void entry.done.then(
        () => pool.give(block),
        () => pool.give(block),
      );
    else pool.give(block);
  }

  /** Reads block `index` as committed into `base`, then copies it into `block` around what was written there meanwhile. */
  private fillIn(index: number, block: Buffer, base: Buffer): void {
    const entry: Unfilled = { block, written: [], done: Promise.resolve() };
    const pool = this.budget.blocks;
    entry.done = this.fill(index * BLOCK_SIZE, base, false).then(
      () => {
        if (this.unfilled.get(index) === entry) this.unfilled.delete(index);
        const w = entry.written;
        const ranges: [number, number][] = [];
        for (let k = 0; k < w.length; k += 2) ranges.push([w[k], w[k + 1]]);
        ranges.sort((a, b) => a[0] - b[0]);
        let pos = 0;
        for (const [from, to] of ranges) {
          if (from > pos) base.copy(block, pos, pos, from);
          pos = Math.max(pos, to);
        }
        if (pos < BLOCK_SIZE) base.copy(block, pos, pos, BLOCK_SIZE);
        pool.give(base);
      },
      (err: Error) => {
        // The block's other bytes are lost to this buffer: the disk's writes fail from here on.
        pool.give(base);
        if (this.unfilled.get(index) === entry) this.unfilled.delete(index);
        this.failure ??= err;
        throw err;
      },
    );
    entry.done.catch(() => undefined); // awaited by whoever reads or commits the block
    this.unfilled.set(index, entry);
  }

  /** Block `index` as the newest commit under way takes it (null: zeros; undefined: none takes it). */
  private committed(index: number): Buffer | null | undefined {
    for (let k = this.committing.length - 1; k >= 0; k--) {
      const b = this.committing[k].get(index);
      if (b !== undefined) return b;
    }
    return undefined;
  }

  /** Waits until `block` (block `index`'s buffer) holds all its bytes. */
  private async filled(index: number, block: Buffer): Promise<void> {
    const entry = this.unfilled.get(index);
    if (entry && entry.block === block) await entry.done;
  }

  private async set(index: number, block: Buffer | null): Promise<void> {
    for (;;) {
      const old = this.dirty.get(index);
      const grows = cost(block) - (old === undefined ? 0 : cost(old));
      // A write that adds nothing, or the first of a batch, always goes in.
      const bounded = grows > 0 && this.dirty.size > 0;
      const full = bounded && this.dirtyBytes + grows > this.limits.diskBytes;
      if (!full && !(bounded && this.budget.used >= this.budget.total)) {
        this.budget.used += grows;
        this.dirtyBytes += grows;
        if (old !== block) this.drop(index, old);
        break;
      }
      // Room comes when a commit takes the blocks (not when it ends): the writes go on while it runs. When the
      // memory is held by commits under way and the disk's share is not full, their end makes room instead of a
      // commit of the few blocks written since.
      const room = new Promise<void>((r) => this.room.push(r));
      if (full || this.committing.length === 0) (this.queued ?? this.enqueue(false)).catch(() => undefined); // its failure is kept, and thrown below
      await room;
      if (this.failure) throw this.failure;
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
   * Queues a commit; resolves when it has ended (and so every commit before it). One asked for while a capture
   * holds the disk waits for the hold to end before it joins the queue: inside the queue it would stand in front
   * of the capture's own commit and wait for it, which waits for the hold to end. A commit takes its blocks once
   * the one before the last has ended: the next segment is hashed, written and made durable while the last one is
   * indexed, and at most two batches are under way.
   */
  private async enqueue(forced: boolean): Promise<void> {
    if (!forced) while (this.holds > 0) await new Promise<void>((r) => this.released.push(r));
    const run = this.chain.then(() => this.commitOnce());
    this.chain = run.then(
      (c) => c.next,
      () => undefined,
    );
    const ended = run.then((c) => c.ended);
    this.queued = ended;
    void this.chain.then(() => {
      if (this.queued === ended) this.queued = null;
    });
    return ended;
  }

  /** Takes the blocks written so far into a commit; `ended` settles with it, `next` when the next may start. */
  private commitOnce(): { ended: Promise<void>; next: Promise<void> } {
    const before = this.lastEnd;
    const next = before.then(
      () => undefined,
      () => undefined,
    );
    // Rows up to `upTo` hold only writes this commit takes (or earlier ones): it deletes them.
    const upTo = this.seq;
    if (this.dirty.size === 0 && upTo <= this.takenSeq) return { ended: before, next };
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const taken = this.dirty;
    const takenBytes = this.dirtyBytes;
    this.committing.push(taken);
    this.dirty = new Map();
    this.dirtyBytes = 0;
    this.takenSeq = upTo;
    this.queued = null;
    this.makeRoom();
    let covered: (() => void) | null = null;
    let covering: Promise<void> | null = null;
    if (this.logOverflow) {
      // The writes no row holds are all in this commit: a FLUSH from now on waits for it, and journals what comes after.
      this.logOverflow = false;
      this.log = [];
      this.logBytes = 0;
      covering = new Promise<void>((resolve) => (covered = resolve));
      this.covering = covering;
    }
    const blocks = [...taken].sort((a, b) => a[0] - b[0]);
    const ended = (async () => {
      try {
        await Promise.all(blocks.map(([i, b]) => (b ? this.filled(i, b) : undefined)));
        await this.appending;
        const stored = await this.store.commit(this.projectId, this.diskId, blocks, { journalUpTo: upTo, restores: this.restores, source: this, after: before });
        // The kept block map now points where the blocks went (the volume store tells every other writer to forget theirs).
        this.patch(blocks, stored);
        this.committing.splice(this.committing.indexOf(taken), 1);
        this.budget.used -= takenBytes;
        // Every read copies a pending block in the turn it finds it, and no fill is left: the buffers are free.
        for (const [, b] of blocks) if (b) this.budget.blocks.give(b);
      } catch (err) {
        // The blocks stay where reads find them, under newer writes; what comes next fails.
        this.failure ??= err as Error;
        throw err;
      } finally {
        if (covering && this.covering === covering) this.covering = null;
        (covered as (() => void) | null)?.();
        this.makeRoom();
      }
    })();
    ended.catch(() => undefined); // the next commit and whoever queued this one see the failure
    this.lastEnd = ended;
    return { ended, next };
  }

  private makeRoom(): void {
    for (const r of this.room.splice(0)) r();
  }
}
