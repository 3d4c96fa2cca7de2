/**
 * The work a schedule costs is bounded: rules whose days come once in decades, steps
 * that meet them once in a century or two, and schedules of 24 such rules are checked
 * and computed in milliseconds (they took up to seconds, all that time holding the
 * event loop), with the same answers as before.
 */
import fs from "node:fs";
import { checkSchedule, nextOccurrence } from "../../src/domain/schedule";

/**
 * CPU time, far above what these take now (a few ms), far below what they took (0.7 to 3 s
 * for 24 rules). CPU time, not wall time: on a busy machine a test waits for a CPU too.
 */
const LIMIT_MS = 250;
/**
 * CPU milliseconds this thread spends in `fn`: Linux's schedstat of the calling thread,
 * so the process's other threads (the garbage collector's helpers finishing the work of
 * a test before) are not counted, as they are in process.cpuUsage().
 */
function cpuMs(fn: () => void): number {
  const onCpuNs = () => Number(fs.readFileSync("/proc/thread-self/schedstat", "utf8").split(" ")[0]);
  const before = onCpuNs();
  fn();
  return (onCpuNs() - before) / 1e6;
}
const hours = (rule: (h: number) => string) => Array.from({ length: 24 }, (_, h) => rule(h));
const after = new Date("2026-12-06T22:00:00Z");
const anchor = new Date("2026-11-01T00:00:00Z");

const cases: [string, string[], string | null][] = [
  ["a day once in 28 years, every minute", ["FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA"], "2048-02-28T23:00:00.000Z"],
  ["such a day met by a 3-day step", ["FREQ=DAILY;INTERVAL=3;BYMONTH=2;BYMONTHDAY=-29;BYDAY=SU;BYMINUTE=59"], "2128-01-31T23:59:00.000Z"],
  ["such a day met by a 5-hour step", ["FREQ=HOURLY;INTERVAL=5;BYHOUR=3;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA"], "2144-02-29T02:00:00.000Z"],
  ["a 997-minute step meeting a leap day", ["FREQ=MINUTELY;INTERVAL=997;BYMINUTE=5;BYMONTH=2;BYMONTHDAY=29"], "2156-02-29T07:05:00.000Z"],
  ["a 997-minute step that never meets its day", ["FREQ=MINUTELY;INTERVAL=997;BYMINUTE=5;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA"], null],
  ["24 rules on a day once in 28 years", hours((h) => `FREQ=MINUTELY;BYMONTH=2;BYMONTHDAY=29;BYDAY=SA;BYHOUR=${h}`), "2048-02-28T23:00:00.000Z"],
  ["24 rules met by a 3-day step", hours((h) => `FREQ=DAILY;INTERVAL=3;BYMONTH=2;BYMONTHDAY=-29;BYDAY=SU;BYHOUR=${h};BYMINUTE=59`), "2128-01-31T23:59:00.000Z"],
  ["24 rules met by a 5-hour step", hours((h) => `FREQ=HOURLY;INTERVAL=5;BYHOUR=${h};BYMONTH=2;BYMONTHDAY=29;BYDAY=SA`), "2048-02-28T23:00:00.000Z"],
  ["24 monthly rules with ordinals", hours((h) => `FREQ=MONTHLY;BYMONTH=2;BYMONTHDAY=29;BYDAY=-1SA;BYHOUR=${h}`), "2048-02-28T23:00:00.000Z"],
  ["24 monthly rules with BYSETPOS", hours((h) => `FREQ=MONTHLY;BYMONTH=2;BYDAY=SA;BYMONTHDAY=29;BYSETPOS=1;BYHOUR=${h}`), "2048-02-28T23:00:00.000Z"],
  ["24 yearly rules with week numbers", hours((h) => `FREQ=YEARLY;BYWEEKNO=53;BYDAY=TH;BYMONTH=12;BYMONTHDAY=31;BYHOUR=${h}`), "2026-12-30T23:00:00.000Z"],
  ["23 rules whose BYSETPOS no month has, and one that fires", hours((h) => (h ? `FREQ=MONTHLY;BYHOUR=${h};BYSETPOS=366` : "FREQ=DAILY;BYHOUR=0")), "2026-12-06T23:00:00.000Z"],
];

it.each(cases)("%s: checked and computed within the limit, with the same answer", (_, schedule, next) => {
  // Once to load what the code uses, then measured.
  checkSchedule(schedule);
  nextOccurrence(schedule, "Europe/Berlin", after, anchor);
  // The least of three runs: a garbage collection of what earlier tests left can land in any one of them.
  const ms = Math.min(
    ...[1, 2, 3].map(() =>
      cpuMs(() => {
        expect(checkSchedule(schedule)).toHaveLength(schedule.length);
        expect(nextOccurrence(schedule, "Europe/Berlin", after, anchor)?.toISOString() ?? null).toBe(next);
      }),
    ),
  );
  if (ms > LIMIT_MS) throw new Error(`${JSON.stringify(schedule)} took ${Math.round(ms)} ms (limit ${LIMIT_MS})`);
});

it.each([
  ["FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30", "never fires: no date matches BYMONTH, BYMONTHDAY together"],
  ["FREQ=MONTHLY;BYDAY=1MO;BYSETPOS=5", "never fires: no date matches BYDAY, BYSETPOS together"],
])("refuses %j within the limit", (rule, message) => {
  expect(cpuMs(() => expect(() => checkSchedule([rule])).toThrow(message))).toBeLessThan(LIMIT_MS);
});

it("keeps a MONTHLY rule without a day on the anchor's day, though a month it steps over is shorter", () => {
  // From November 29th, 15 months on is February 2029, which has no 29th; 30 months on is May 29th, 2030.
  const got = nextOccurrence(["FREQ=MONTHLY;INTERVAL=15"], "Australia/Lord_Howe", new Date("2027-12-23T08:04:13Z"), new Date("2027-11-28T15:25:13Z"));
  expect(got?.toISOString()).toBe("2030-05-28T13:30:00.000Z");
});
