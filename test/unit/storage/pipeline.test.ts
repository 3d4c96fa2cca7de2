import { mapOrdered } from "../../../src/storage/pipeline";
import { prng } from "../../helpers/formats";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** fn for mapOrdered that waits a random few milliseconds and records how many calls run at once. */
function tracked(seed: number, maxDelay = 8) {
  const rnd = prng(seed);
  const stats = { running: 0, most: 0, started: [] as number[], finished: [] as number[] };
  const fn = async (n: number) => {
    stats.running++;
    stats.most = Math.max(stats.most, stats.running);
    stats.started.push(n);
    try {
      await sleep(Math.floor(rnd() * maxDelay));
      return n * 10;
    } finally {
      stats.running--;
      stats.finished.push(n);
    }
  };
  return { fn, stats };
}

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

async function* slowly(items: number[], rnd: () => number) {
  for (const i of items) {
    await sleep(Math.floor(rnd() * 3));
    yield i;
  }
}

describe("mapOrdered", () => {
  it.each([1, 2, 4, 7])("yields results in input order despite random delays, with at most %i calls in flight", async (limit) => {
    const { fn, stats } = tracked(limit);
    const out: number[] = [];
    for await (const r of mapOrdered(range(40), limit, fn)) out.push(r);
    expect(out).toEqual(range(40).map((n) => n * 10));
    expect(stats.most).toBeLessThanOrEqual(limit);
    expect(stats.running).toBe(0);
    if (limit > 1) expect(stats.most).toBeGreaterThan(1); // it does overlap
  });

  it("takes an async source, and keeps the limit while a slow consumer works", async () => {
    const { fn, stats } = tracked(99);
    const out: number[] = [];
    for await (const r of mapOrdered(slowly(range(30), prng(5)), 3, fn)) {
      expect(stats.running).toBeLessThanOrEqual(3);
      await sleep(2);
      out.push(r);
    }
    expect(out).toEqual(range(30).map((n) => n * 10));
    expect(stats.most).toBeLessThanOrEqual(3);
  });

  it("handles an empty source and fewer items than the limit", async () => {
    const out: number[] = [];
    for await (const r of mapOrdered([], 4, async (n: number) => n)) out.push(r);
    expect(out).toEqual([]);
    for await (const r of mapOrdered([1, 2], 8, async (n: number) => n + 1)) out.push(r);
    expect(out).toEqual([2, 3]);
  });

  it("passes a failed call's error to the consumer, after the results before it, with nothing left running", async () => {
    const { fn, stats } = tracked(7);
    const failing = async (n: number) => {
      if (n === 5) {
        await sleep(1);
        throw new Error("item 5 failed");
      }
      return fn(n);
    };
    const out: number[] = [];
    await expect(
      (async () => {
        for await (const r of mapOrdered(range(20), 4, failing)) out.push(r);
      })(),
    ).rejects.toThrow("item 5 failed");
    expect(out).toEqual([0, 10, 20, 30, 40]);
    expect(stats.running).toBe(0);
  });

  it("passes a failure of the source to the consumer", async () => {
    async function* broken() {
      yield 1;
      yield 2;
      throw new Error("source broke");
    }
    const { fn, stats } = tracked(8);
    const out: number[] = [];
    await expect(
      (async () => {
        for await (const r of mapOrdered(broken(), 4, fn)) out.push(r);
      })(),
    ).rejects.toThrow("source broke");
    expect(stats.running).toBe(0);
  });

  it("does not report an unhandled rejection for a failure the consumer never reaches", async () => {
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown) => unhandled.push(e);
    process.on("unhandledRejection", onUnhandled);
    try {
      const gen = mapOrdered(range(6), 4, async (n) => {
        if (n === 3) throw new Error("never seen");
        await sleep(5);
        return n;
      });
      for await (const r of gen) if (r === 0) break;
      await sleep(20);
      expect(unhandled).toEqual([]);
    } finally {
      process.off("unhandledRejection", onUnhandled);
    }
  });

  it("when the consumer stops early, no call is left running once the loop has ended", async () => {
    for (const limit of [1, 3, 6]) {
      const { fn, stats } = tracked(limit, 15);
      let pulled = 0;
      async function* source() {
        for (let i = 0; i < 100; i++) {
          pulled++;
          yield i;
        }
      }
      const out: number[] = [];
      for await (const r of mapOrdered(source(), limit, fn)) {
        out.push(r);
        if (out.length === 4) break;
      }
      expect(stats.running).toBe(0);
      expect(stats.finished.sort((a, b) => a - b)).toEqual(stats.started.sort((a, b) => a - b));
      // It read ahead no further than the limit.
      expect(pulled).toBeLessThanOrEqual(4 + limit);
      expect(out).toEqual([0, 10, 20, 30]);
      // And nothing starts later either.
      const startedAtBreak = stats.started.length;
      await sleep(30);
      expect(stats.started.length).toBe(startedAtBreak);
    }
  });

  it("when the consumer throws, no call is left running", async () => {
    const { fn, stats } = tracked(11, 20);
    await expect(
      (async () => {
        for await (const r of mapOrdered(range(50), 5, fn)) if (r === 20) throw new Error("consumer gave up");
      })(),
    ).rejects.toThrow("consumer gave up");
    expect(stats.running).toBe(0);
  });
});
