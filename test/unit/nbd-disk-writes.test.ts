import { DiskWrites, WriteBudget, type BlockStore, type StoredBlock } from "../../src/nbd/disk-writes";
import { decodeRecords, type WriteJournal } from "../../src/nbd/journal";

const BS = 64 * 1024;

/** Journal rows kept in memory. */
class MemoryJournal implements WriteJournal {
  readonly kept = new Map<number, Buffer>();
  /** Appends started; each waits for the next of `gates` there is, in turn. */
  appends = 0;
  gates: Promise<void>[] = [];
  async append(_diskId: string, seq: number, records: Buffer): Promise<void> {
    this.appends++;
    const gate = this.gates.shift();
    if (gate) await gate;
    this.kept.set(seq, Buffer.from(records));
  }
  async rows(_diskId: string, afterSeq: number, limit: number) {
    return [...this.kept]
      .filter(([seq]) => seq > afterSeq)
      .sort((a, b) => a[0] - b[0])
      .slice(0, limit)
      .map(([seq, records]) => ({ seq, records }));
  }
}

/**
 * Blocks kept in memory; a commit waits for `gate` when one is set, records what it committed,
 * deletes the journal rows it covers (as the real store does, in the same step) and fails
 * while `failing` is set. A read of the store waits for `readGate` when one is set.
 */
class MemoryStore implements BlockStore {
  readonly blocks = new Map<number, Buffer>();
  /** A clone's source: its blocks read where the disk has committed nothing of its own (not even zeros). */
  readonly source = new Map<number, Buffer>();
  private readonly own = new Set<number>();
  readonly commits: number[][] = [];
  /** The blocks of every commit asked for, as it starts (before its gate and the commit before it). */
  readonly started: number[][] = [];
  gate: Promise<void> | null = null;
  readGate: Promise<void> | null = null;
  /** A read of the block map waits for it when one is set. */
  refsGate: Promise<void> | null = null;
  failing = false;
  constructor(readonly journal: MemoryJournal | null = null) {}

  async refs(_diskId: string, first: number, last: number): Promise<StoredBlock[]> {
    // The map as it is when asked for: a commit that ends while the answer is on its way is not in it.
    const sourced = [...this.source.keys()].filter((i) => !this.own.has(i) && !this.blocks.has(i));
    const refs = [...this.blocks.keys(), ...sourced]
      .filter((i) => i >= first && i <= last)
      .sort((a, b) => a - b)
      .map((index) => (this.blocks.has(index) ? { index, segmentId: String(index), offset: 0 } : { index, segmentId: null, offset: 0, hash: Buffer.from(String(index)) }));
    if (this.refsGate) await this.refsGate;
    return refs;
  }

  async readVault(_projectId: string, hashes: Buffer[]): Promise<Buffer[]> {
    if (this.readGate) await this.readGate;
    return hashes.map((h) => this.source.get(Number(h.toString()))!);
  }

  async readRun(_diskId: string, segmentId: string, offset: number, into: Buffer): Promise<void> {
    if (this.readGate) await this.readGate;
    // One block per "segment" here: runs never span blocks.
    this.blocks.get(Number(segmentId))!.copy(into, 0, offset, offset + into.length);
  }

  /** Holds every commit ("gate") or read of the block map ("refsGate") until the returned function is called. */
  hold(which: "gate" | "refsGate"): () => void {
    const held = opened();
    this[which] = held.promise;
    return () => {
      this[which] = null;
      held.open();
    };
  }

  async restores(): Promise<number> {
    return 0;
  }

  async commit(_projectId: string, _diskId: string, blocks: [number, Buffer | null][], { journalUpTo, after }: { journalUpTo: number; after: Promise<unknown> }): Promise<StoredBlock[]> {
    this.started.push(blocks.map(([i]) => i));
    if (this.gate) await this.gate;
    if (this.failing) throw new Error("the store is failing");
    await after; // as the volume store does: the blocks are stored, and become the disk's after the commit before
    if (this.failing) throw new Error("the store is failing");
    this.commits.push(blocks.map(([i]) => i));
    for (const seq of [...(this.journal?.kept.keys() ?? [])]) if (seq <= journalUpTo) this.journal!.kept.delete(seq);
    for (const [i, b] of blocks) {
      this.own.add(i);
      if (b) this.blocks.set(i, Buffer.from(b));
      else this.blocks.delete(i);
    }
    return blocks.filter(([, b]) => b).map(([index]) => ({ index, segmentId: String(index), offset: 0 }));
  }
}

function writes(store: MemoryStore, diskBytes = 64 * BS) {
  const w = new DiskWrites(store, "p", "d", 256 * BS, new WriteBudget(1024 * BS), { diskBytes, delayMs: 60_000 });
  if (store.journal) void w.start(Promise.resolve(store.journal));
  return w;
}

function opened(): { promise: Promise<void>; open: () => void } {
  let open!: () => void;
  const promise = new Promise<void>((r) => (open = r));
  return { promise, open };
}

test("reads see acknowledged writes before and after their commit, partial blocks keep their other bytes", async () => {
  const store = new MemoryStore();
  store.blocks.set(1, Buffer.alloc(BS, 7));
  const w = writes(store);
  await w.write(BS + 10, Buffer.from("hello"));
  expect((await w.read(BS + 8, 9)).toString("latin1")).toBe("\x07\x07hello\x07\x07");
  expect(store.commits).toEqual([]);
  await w.flush();
  expect(store.commits).toEqual([[1]]);
  expect((await w.read(BS + 8, 9)).toString("latin1")).toBe("\x07\x07hello\x07\x07");
  await w.zero(0, 3 * BS);
  expect((await w.extents(0, 4 * BS)).length).toBe(1);
  expect((await w.read(BS, BS)).equals(Buffer.alloc(BS))).toBe(true);
});

test("a clone reads its source's blocks until it writes them; a partial write keeps the source's other bytes, zeros hide them", async () => {
  const store = new MemoryStore();
  store.source.set(1, Buffer.alloc(BS, 5));
  store.source.set(2, Buffer.alloc(BS, 6));
  store.source.set(3, Buffer.alloc(BS, 8));
  const w = writes(store);
  expect((await w.read(BS - 2, 4)).toString("hex")).toBe("00000505");
  await w.write(BS + 10, Buffer.from("hi"));
  await w.zero(2 * BS, BS);
  expect((await w.read(BS + 8, 6)).toString("latin1")).toBe("\x05\x05hi\x05\x05");
  expect(await w.extents(0, 4 * BS)).toEqual([
    { length: BS, data: false },
    { length: BS, data: true },
    { length: BS, data: false },
    { length: BS, data: true },
  ]);
  await w.flush();
  expect(store.commits).toEqual([[1, 2]]);
  // Committed: the partial block whole in the disk's own blocks, the zeroed one no longer reading the source.
  expect(store.blocks.get(1)!.subarray(8, 14).toString("latin1")).toBe("\x05\x05hi\x05\x05");
  w.invalidate();
  expect((await w.read(2 * BS, 2 * BS)).equals(Buffer.concat([Buffer.alloc(BS), Buffer.alloc(BS, 8)]))).toBe(true);
});

test("a capture taken while a commit runs and another waits completes, and holds exactly the writes acknowledged before its instant", async () => {
  const store = new MemoryStore();
  const w = writes(store);
  await w.write(0, Buffer.alloc(BS, 1));
  const slow = opened();
  store.gate = slow.promise;
  const first = w.flush(); // running, held at the gate
  await w.write(BS, Buffer.alloc(BS, 2));
  const second = w.flush(); // queued behind it
  let captured: number[] = [];
  let late: Promise<void> | null = null;
  const capture = w.hold(async () => {
    // Acknowledged during the capture: after its instant.
    await w.write(3 * BS, Buffer.alloc(BS, 4));
    late = w.flush();
    await new Promise((r) => setTimeout(r, 20));
    captured = [...store.blocks.keys()].sort();
  });
  // Acknowledged before the capture's own commit ran: before its instant.
  await w.write(2 * BS, Buffer.alloc(BS, 3));
  store.gate = null;
  slow.open();
  await Promise.all([first, second, capture]);
  expect(captured).toEqual([0, 1, 2]);
  await late;
  expect([...store.blocks.keys()].sort()).toEqual([0, 1, 2, 3]);
});

test("a write waits for a commit when the disk's share is full, and a capture in between does not stall it", async () => {
  const store = new MemoryStore();
  const w = writes(store, 4 * BS);
  for (let i = 0; i < 4; i++) await w.write(i * BS, Buffer.alloc(BS, i + 1));
  const slow = opened();
  store.gate = slow.promise;
  const blocked = w.write(4 * BS, Buffer.alloc(BS, 9)); // must commit first
  const capture = w.hold(async () => undefined);
  setTimeout(() => {
    store.gate = null;
    slow.open();
  }, 20);
  await Promise.all([blocked, capture]);
  await w.flush();
  expect((await w.read(4 * BS, 1))[0]).toBe(9);
  expect(store.blocks.size).toBe(5);
});

test("the two halves of a block written around a commit (one running, then one done) both stay", async () => {
  const store = new MemoryStore();
  const w = writes(store);
  await w.write(0, Buffer.alloc(BS / 2, 0xaa));
  const slow = opened();
  store.gate = slow.promise;
  const running = w.flush(); // the first half is being committed
  await w.write(BS / 2, Buffer.alloc(BS / 4, 0xbb));
  slow.open();
  store.gate = null;
  await running;
  await w.flush(); // committed: the last quarter now comes from the store
  await w.write((3 * BS) / 4, Buffer.alloc(BS / 4, 0xcc));
  await w.flush();
  const expected = Buffer.concat([Buffer.alloc(BS / 2, 0xaa), Buffer.alloc(BS / 4, 0xbb), Buffer.alloc(BS / 4, 0xcc)]);
  expect(store.blocks.get(0)!.equals(expected)).toBe(true);
  expect((await w.read(0, BS)).equals(expected)).toBe(true);
});

/** What the disk reads as, whole, through a fresh owner of its writes (one that applied the journal). */
async function afterRestart(store: MemoryStore): Promise<Buffer> {
  const w = writes(store);
  return w.read(0, 256 * BS);
}

test("a FLUSH journals the writes since the last one, as they came, and commits nothing; whoever next owns the disk applies and commits them", async () => {
  const store = new MemoryStore(new MemoryJournal());
  store.blocks.set(3, Buffer.alloc(BS, 7));
  const w = writes(store);
  await w.write(3 * BS + 100, Buffer.from("hello"));
  await w.zero(3 * BS + 200, 10);
  await w.write(9 * BS, Buffer.alloc(2 * BS, 5));
  await w.flush();
  expect(store.commits).toEqual([]);
  const rows = [...store.journal!.kept.values()];
  expect(rows).toHaveLength(1);
  expect(decodeRecords(rows[0]).map((r) => [r.offset, r.length, r.data === null])).toEqual([
    [3 * BS + 100, 5, false],
    [3 * BS + 200, 10, true],
    [9 * BS, 2 * BS, false],
  ]);
  // The process dies here: its memory is gone, the store and the journal stay.
  const expected = Buffer.alloc(256 * BS);
  expected.fill(7, 3 * BS, 4 * BS);
  expected.write("hello", 3 * BS + 100);
  expected.fill(0, 3 * BS + 200, 3 * BS + 210);
  expected.fill(5, 9 * BS, 11 * BS);
  expect((await afterRestart(store)).equals(expected)).toBe(true);
  expect(store.commits).toEqual([[3, 9, 10]]);
  expect(store.journal!.kept.size).toBe(0);
});

test("writes taken by a running commit and journaled after it are applied again in order, and a row a failed commit left stays for the next owner", async () => {
  const store = new MemoryStore(new MemoryJournal());
  const w = writes(store);
  await w.write(0, Buffer.alloc(BS, 1)); // not journaled when the commit takes it
  const slow = opened();
  store.gate = slow.promise;
  const running = w.commitNow();
  await w.write(100, Buffer.alloc(10, 2)); // after the commit took block 0
  await w.flush(); // one row: both writes, in order
  slow.open();
  store.gate = null;
  await running;
  expect(store.journal!.kept.size).toBe(1); // the second write is not committed yet
  store.failing = true;
  await expect(w.commitNow()).rejects.toThrow("failing");
  await expect(w.write(0, Buffer.alloc(1))).rejects.toThrow("failing");
  expect(store.journal!.kept.size).toBe(1);
  store.failing = false;
  const expected = Buffer.alloc(256 * BS);
  expected.fill(1, 0, BS);
  expected.fill(2, 100, 110);
  expect((await afterRestart(store)).equals(expected)).toBe(true);
  expect(store.journal!.kept.size).toBe(0);
});

test("FLUSHes that come while the journal appends share its next row, and each returns once a row holds its writes", async () => {
  const journal = new MemoryJournal();
  const store = new MemoryStore(journal);
  const w = writes(store);
  const [slow1, slow2] = [opened(), opened()];
  journal.gates = [slow1.promise, slow2.promise];
  const returned: string[] = [];
  const flush = (name: string) => w.flush().then(() => returned.push(name));
  await w.write(0, Buffer.from("a"));
  const first = flush("first");
  await new Promise((r) => setTimeout(r, 5));
  expect(journal.appends).toBe(1);
  await w.write(10, Buffer.from("b"));
  const second = flush("second");
  await w.write(20, Buffer.from("c"));
  const third = flush("third");
  await new Promise((r) => setTimeout(r, 5));
  expect(returned).toEqual([]);
  slow1.open();
  await first;
  await new Promise((r) => setTimeout(r, 5));
  expect(returned).toEqual(["first"]);
  expect(journal.appends).toBe(2);
  slow2.open();
  await Promise.all([second, third]);
  expect(returned).toEqual(["first", "second", "third"]);
  const rows = [...journal.kept.entries()].sort((a, b) => a[0] - b[0]).map(([, r]) => decodeRecords(r).map((x) => [x.offset, x.data!.toString()]));
  expect(rows).toEqual([
    [[0, "a"]],
    [
      [10, "b"],
      [20, "c"],
    ],
  ]);
  expect(store.commits).toEqual([]);
});

test("more than a FLUSH's worth of journal between two FLUSHes commits instead, and what comes after is journaled again", async () => {
  const store = new MemoryStore(new MemoryJournal());
  const w = new DiskWrites(store, "p", "d", 1024 * BS, new WriteBudget(1024 * BS), { diskBytes: 512 * BS, delayMs: 60_000 });
  void w.start(Promise.resolve(store.journal));
  for (let i = 0; i < 130; i++) await w.write(i * BS, Buffer.alloc(BS, i % 251)); // 8.1 MiB
  await w.flush();
  expect(store.commits).toHaveLength(1);
  expect(store.journal!.kept.size).toBe(0);
  await w.write(5, Buffer.from("x"));
  await w.flush();
  expect(store.commits).toHaveLength(1);
  expect(store.journal!.kept.size).toBe(1);
});

test("a write into part of a stored block is taken before the block's other bytes arrive; reads and commits wait for them, and later writes win", async () => {
  const store = new MemoryStore();
  store.blocks.set(2, Buffer.alloc(BS, 0x11));
  const w = writes(store);
  const slow = opened();
  store.readGate = slow.promise;
  await w.write(2 * BS + 10, Buffer.alloc(10, 0x22)); // acknowledged with the store's read still held
  await w.write(2 * BS + 15, Buffer.alloc(10, 0x33));
  await w.zero(2 * BS + 30, 5);
  const reading = w.read(2 * BS, BS);
  const committing = w.flush();
  let settled = false;
  void Promise.all([reading, committing]).then(() => (settled = true));
  await new Promise((r) => setTimeout(r, 20));
  expect(settled).toBe(false);
  store.readGate = null;
  slow.open();
  const expected = Buffer.alloc(BS, 0x11);
  expected.fill(0x22, 10, 15);
  expected.fill(0x33, 15, 25);
  expected.fill(0, 30, 35);
  expect((await reading).equals(expected)).toBe(true);
  await committing;
  expect(store.blocks.get(2)!.equals(expected)).toBe(true);
});

test("a block's buffer goes back to the pool when its commit ends: a read that met the block pending takes the committed bytes, not the next write's", async () => {
  const store = new MemoryStore();
  store.blocks.set(1, Buffer.alloc(BS, 1));
  const w = writes(store);
  await w.write(2 * BS, Buffer.alloc(BS, 2));
  const endCommit = store.hold("gate");
  const committed = w.commitNow(); // block 2 is being committed
  // The read finds block 1 in the store (its map is still being read) and block 2 pending.
  const endMapRead = store.hold("refsGate");
  const reading = w.read(BS, 2 * BS);
  await new Promise((r) => setImmediate(r));
  endCommit();
  await committed;
  // The next write takes the buffer block 2 had (the pool gives back the last one returned) and fills it.
  await w.write(5 * BS, Buffer.alloc(BS, 5));
  endMapRead();
  const read = await reading;
  expect(read.subarray(0, BS).equals(Buffer.alloc(BS, 1))).toBe(true);
  expect(read.subarray(BS).equals(Buffer.alloc(BS, 2))).toBe(true);
  expect((await w.read(5 * BS, BS)).equals(Buffer.alloc(BS, 5))).toBe(true);
});

test("block buffers are reused from commit to commit: rewriting the same blocks takes no new ones", async () => {
  const store = new MemoryStore();
  const budget = new WriteBudget(1024 * BS);
  const w = new DiskWrites(store, "p", "d", 256 * BS, budget, { diskBytes: 64 * BS, delayMs: 60_000 });
  const taken = new Set<ArrayBufferLike>();
  const take = budget.blocks.take.bind(budget.blocks);
  budget.blocks.take = (n: number) => {
    const b = take(n);
    taken.add(b.buffer);
    return b;
  };
  for (let round = 0; round < 5; round++) {
    for (let i = 0; i < 16; i++) await w.write(i * BS, Buffer.alloc(BS, round + 1));
    await w.commitNow();
  }
  expect(taken.size).toBe(16);
  expect((await w.read(15 * BS, BS)).equals(Buffer.alloc(BS, 5))).toBe(true);
});

/** Block 0 (ones) committed behind a closed gate, then blocks `next` (twos) committed beside it; both have started. */
async function twoUnderWay(next: number[]) {
  const store = new MemoryStore();
  const w = writes(store);
  await w.write(0, Buffer.alloc(BS, 1));
  const endCommits = store.hold("gate");
  const first = w.commitNow();
  for (const i of next) await w.write(i * BS, Buffer.alloc(BS, 2));
  const second = w.commitNow();
  await new Promise((r) => setImmediate(r));
  expect(store.started).toEqual([[0], next]);
  return { store, w, endCommits, first, second };
}

test("two commits are under way at once: the second stores its blocks while the first runs and becomes the disk's after it; reads see the newest", async () => {
  const { store, w, endCommits, first, second } = await twoUnderWay([0, 1]);
  expect(store.commits).toEqual([]);
  expect((await w.read(0, 2 * BS)).equals(Buffer.alloc(2 * BS, 2))).toBe(true);
  // A third waits until the first has ended: no more than two batches are held.
  await w.write(2 * BS, Buffer.alloc(BS, 3));
  const third = w.commitNow();
  await new Promise((r) => setImmediate(r));
  expect(store.started).toHaveLength(2);
  endCommits();
  await Promise.all([first, second, third]);
  expect(store.commits).toEqual([[0], [0, 1], [2]]);
  expect(store.blocks.get(0)!.equals(Buffer.alloc(BS, 2))).toBe(true);
  expect((await w.read(0, 3 * BS)).equals(Buffer.concat([Buffer.alloc(2 * BS, 2), Buffer.alloc(BS, 3)]))).toBe(true);
});

test("when the first of two commits under way fails, the second does not index its blocks, and the disk's writes fail", async () => {
  const { store, w, endCommits, first, second } = await twoUnderWay([1]);
  store.failing = true;
  endCommits();
  await expect(first).rejects.toThrow("the store is failing");
  await expect(second).rejects.toThrow("the store is failing");
  expect(store.commits).toEqual([]);
  await expect(w.write(2 * BS, Buffer.alloc(BS, 3))).rejects.toThrow("the store is failing");
  await expect(w.read(0, BS)).rejects.toThrow("the store is failing");
});

test("a disk whose commit failed gives its blocks back to the process's write budget and its pool once its writes are let go", async () => {
  const store = new MemoryStore();
  store.blocks.set(9, Buffer.alloc(BS, 9));
  const budget = new WriteBudget(1024 * BS);
  const w = new DiskWrites(store, "p", "d", 256 * BS, budget, { diskBytes: 64 * BS, delayMs: 60_000 });
  const given = jest.spyOn(budget.blocks, "give");
  await w.write(0, Buffer.alloc(3 * BS, 1));
  const endCommit = store.hold("gate");
  const committing = w.commitNow(); // blocks 0-2
  await w.write(5 * BS, Buffer.alloc(BS, 5)); // pending beside it
  await w.zero(9 * BS, BS); // a zeroed block that held data: it costs its map entry
  store.failing = true;
  endCommit();
  await expect(committing).rejects.toThrow("the store is failing");
  expect(budget.used).toBe(4 * BS + 64);
  expect(given).not.toHaveBeenCalled();
  await w.stop();
  expect(budget.used).toBe(0);
  expect(given).toHaveBeenCalledTimes(4);
  // A disk let go without a failure has nothing left to give back: its commit gave back its block already.
  const other = new WriteBudget(1024 * BS);
  const healthy = new DiskWrites(new MemoryStore(), "p", "e", 256 * BS, other, { diskBytes: 64 * BS, delayMs: 60_000 });
  await healthy.write(0, Buffer.alloc(BS, 1));
  await healthy.commitNow();
  await healthy.stop();
  expect(other.used).toBe(0);
});

test("zeroing blocks costs their map entries, not a block each: one commit, however many blocks the disk's share would hold", async () => {
  const store = new MemoryStore();
  for (let i = 0; i < 200; i++) store.blocks.set(i, Buffer.alloc(BS, 1));
  const budget = new WriteBudget(8 * BS);
  const w = new DiskWrites(store, "p", "d", 256 * BS, budget, { diskBytes: 4 * BS, delayMs: 60_000 });
  await w.zero(0, 256 * BS);
  expect(store.commits).toEqual([]);
  await w.write(210 * BS, Buffer.alloc(BS, 5)); // a block of data beside them still fits
  await w.commitNow();
  expect(store.commits).toHaveLength(1);
  expect(store.commits[0]).toHaveLength(201);
  expect(budget.used).toBe(0);
  expect(store.blocks.size).toBe(1);
  expect((await w.read(209 * BS, 2 * BS)).equals(Buffer.concat([Buffer.alloc(BS), Buffer.alloc(BS, 5)]))).toBe(true);
});

test("zeroing a whole disk touches only the blocks that hold data: stored, pending, or in a commit that ends while the map is read", async () => {
  const store = new MemoryStore();
  store.blocks.set(3, Buffer.alloc(BS, 3));
  const w = writes(store);
  await w.write(7 * BS, Buffer.alloc(BS, 7));
  const endCommit = store.hold("gate");
  const committing = w.commitNow(); // block 7 is being committed
  await w.write(9 * BS, Buffer.alloc(BS, 9)); // block 9 is pending
  const endMapRead = store.hold("refsGate");
  const zeroing = w.zero(0, 256 * BS);
  await new Promise((r) => setImmediate(r));
  endCommit();
  await committing; // block 7 is stored now, and the map read before it ended does not show it
  endMapRead();
  await zeroing;
  await w.commitNow();
  expect(store.commits).toEqual([[7], [3, 7, 9]]);
  expect(store.blocks.size).toBe(0);
  expect((await w.read(0, 16 * BS)).equals(Buffer.alloc(16 * BS))).toBe(true);
});
