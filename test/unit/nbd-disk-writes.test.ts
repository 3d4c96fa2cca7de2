import { DiskWrites, WriteBudget, type BlockStore, type StoredBlock } from "../../src/nbd/disk-writes";

const BS = 64 * 1024;

/** Blocks kept in memory; a commit waits for `gate` when one is set, and records what it committed. */
class MemoryStore implements BlockStore {
  readonly blocks = new Map<number, Buffer>();
  readonly commits: number[][] = [];
  gate: Promise<void> | null = null;

  async refs(_diskId: string, first: number, last: number): Promise<StoredBlock[]> {
    return [...this.blocks.keys()]
      .filter((i) => i >= first && i <= last)
      .sort((a, b) => a - b)
      .map((index) => ({ index, segmentId: String(index), offset: 0 }));
  }

  async readRun(_diskId: string, segmentId: string, offset: number, into: Buffer): Promise<void> {
    // One block per "segment" here: runs never span blocks.
    this.blocks.get(Number(segmentId))!.copy(into, 0, offset, offset + into.length);
  }

  async commit(_projectId: string, _diskId: string, blocks: [number, Buffer | null][]): Promise<void> {
    if (this.gate) await this.gate;
    this.commits.push(blocks.map(([i]) => i));
    for (const [i, b] of blocks) {
      if (b) this.blocks.set(i, Buffer.from(b));
      else this.blocks.delete(i);
    }
  }
}

function writes(store: MemoryStore, diskBytes = 64 * BS) {
  return new DiskWrites(store, "p", "d", 256 * BS, new WriteBudget(1024 * BS), { diskBytes, delayMs: 60_000 });
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
