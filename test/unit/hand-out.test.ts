/**
 * HandOut: a project's events reach its receivers in rounds, after their reads,
 * a slice of receivers per turn of the event loop, and every receiver of a round
 * takes the same events.
 */
import type { JobEvent } from "../../src/jobs/events";
import { HandOut, keepLatest, type Receiver } from "../../src/services/hand-out";

const event = (jobId: string, status = "RUNNING"): JobEvent => ({ projectId: "p", jobId, backupId: null, status });

/** A receiver that records what it took and in which turn of the event loop. */
function receiver(turn: () => number, prepare: (e: JobEvent) => Promise<unknown> | null = () => null) {
  const taken: { events: JobEvent[]; turn: number }[] = [];
  const r: Receiver & { taken: typeof taken } = {
    incoming: [],
    closed: false,
    prepare,
    take: (events) => taken.push({ events, turn: turn() }),
    taken,
  };
  return r;
}

/** Counts turns of the event loop until stopped. */
function turns() {
  let n = 0;
  let on = true;
  const tick = () => {
    n++;
    if (on) setImmediate(tick);
  };
  setImmediate(tick);
  return { now: () => n, stop: () => (on = false) };
}

const until = async (pred: () => boolean) => {
  for (let i = 0; i < 1000 && !pred(); i++) await new Promise((r) => setImmediate(r));
  if (!pred()) throw new Error("not reached");
};

it("hands an event to many receivers a slice per turn, after one read of it", async () => {
  const clock = turns();
  const handOut = new HandOut();
  let resolveRead!: () => void;
  const read = new Promise<void>((r) => (resolveRead = r));
  const prepared: JobEvent[] = [];
  const prepare = (e: JobEvent) => (prepared.push(e), read);
  const rs = Array.from({ length: 300 }, () => receiver(clock.now, prepare));
  const e = event("j1");
  for (const r of rs) {
    keepLatest(r.incoming, e);
    handOut.heard("p", r);
  }
  await new Promise((r) => setTimeout(r, 20));
  expect(rs.every((r) => r.taken.length === 0)).toBe(true); // nothing before its read
  expect(prepared).toEqual([e]); // one read for all
  resolveRead();
  await until(() => rs.every((r) => r.taken.length === 1));
  clock.stop();
  for (const r of rs) expect(r.taken[0].events).toEqual([e]);
  const perTurn = new Map<number, number>();
  for (const r of rs) perTurn.set(r.taken[0].turn, (perTurn.get(r.taken[0].turn) ?? 0) + 1);
  expect(perTurn.size).toBeGreaterThanOrEqual(5); // 300 receivers, at most 64 a turn
  expect(Math.max(...perTurn.values())).toBeLessThanOrEqual(64);
});

it("gives every receiver the same events: what comes during a round waits for the next, the latest per job", async () => {
  const clock = turns();
  const handOut = new HandOut();
  const rs = Array.from({ length: 200 }, () => receiver(clock.now));
  const hear = (e: JobEvent) => {
    for (const r of rs) {
      keepLatest(r.incoming, e);
      handOut.heard("p", r);
    }
  };
  const first = event("j1", "RUNNING");
  hear(first);
  // The round has begun once the first receiver has taken it; two more states of the job come meanwhile.
  await until(() => rs[0].taken.length === 1);
  expect(rs[rs.length - 1].taken.length).toBe(0);
  const second = event("j1", "RUNNING");
  const third = event("j1", "SUCCEEDED");
  hear(second);
  hear(third);
  await until(() => rs.every((r) => r.taken.length === 2));
  clock.stop();
  for (const r of rs) expect(r.taken.map((t) => t.events)).toEqual([[first], [third]]);
});

it("skips a closed receiver and ends its rounds when nothing is left", async () => {
  const handOut = new HandOut();
  const open = receiver(() => 0);
  const closed = receiver(() => 0);
  for (const r of [open, closed]) {
    keepLatest(r.incoming, event("j1"));
    handOut.heard("p", r);
  }
  closed.closed = true;
  await until(() => open.taken.length === 1);
  // The rounds end once nothing is left (turns of the event loop, not a clock: a loaded machine waits as long as it takes).
  const waiting = (handOut as unknown as { waiting: Map<string, unknown> }).waiting;
  await until(() => waiting.size === 0);
  expect(closed.taken).toEqual([]);
  expect(waiting.size).toBe(0);
});
