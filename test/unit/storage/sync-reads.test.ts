import { SyncReads } from "../../../src/storage/sync-reads";

/** A SyncReads on a clock that only the reads move: each read takes `ms`. */
function gate() {
  let now = 0;
  const reads = new SyncReads(() => now);
  return {
    reads,
    read: (ms: number) => reads.run(() => (now += ms)),
    wait: (ms: number) => (now += ms),
  };
}

describe("SyncReads", () => {
  it("keeps reads synchronous while they are page-cache fast", () => {
    const g = gate();
    for (let i = 0; i < 10_000; i++) {
      expect(g.reads.allowed()).toBe(true);
      g.read(0.004);
    }
  });

  it("sends reads to the thread pool for a second after four slow ones among 64, then tries again", () => {
    const g = gate();
    for (let i = 0; i < 3; i++) g.read(2);
    expect(g.reads.allowed()).toBe(true);
    g.read(0.3);
    expect(g.reads.allowed()).toBe(false);
    g.wait(999);
    expect(g.reads.allowed()).toBe(false);
    g.wait(2);
    expect(g.reads.allowed()).toBe(true);
    // The count starts again: three slow reads do not pause it.
    for (let i = 0; i < 3; i++) g.read(2);
    expect(g.reads.allowed()).toBe(true);
  });

  it("takes a slow read now and then (a preempted thread) for noise", () => {
    const g = gate();
    for (let i = 0; i < 64 * 100; i++) {
      g.read(i % 64 < 3 ? 5 : 0.002);
      expect(g.reads.allowed()).toBe(true);
    }
  });

  it("passes results and errors through, and counts a failed read's time", () => {
    const g = gate();
    expect(g.reads.run(() => 42)).toBe(42);
    let now = 0;
    const reads = new SyncReads(() => now);
    for (let i = 0; i < 4; i++) {
      expect(() =>
        reads.run(() => {
          now += 1;
          throw new Error("EIO");
        }),
      ).toThrow("EIO");
    }
    expect(reads.allowed()).toBe(false);
  });
});
