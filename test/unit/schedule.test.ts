import { isValidTimezone, nextOccurrence, occurrencesBetween, parseRule, ScheduleError } from "../../src/jobs/schedule";

const anchor = new Date("2026-01-01T00:00:00Z");
const iso = (d: Date[]) => d.map((x) => x.toISOString());

describe("nextOccurrence", () => {
  it("reads the rule in the policy's time zone", () => {
    const next = nextOccurrence(["FREQ=DAILY;BYHOUR=2;BYMINUTE=0"], "America/New_York", new Date("2026-06-10T12:00:00Z"), anchor);
    expect(next?.toISOString()).toBe("2026-06-11T06:00:00.000Z"); // 02:00 EDT
  });

  it("moves a time that spring-forward skips to the next valid instant, once", () => {
    // Europe/Berlin skips 02:00-03:00 on 2026-03-29.
    const got = occurrencesBetween(["FREQ=DAILY;BYHOUR=2;BYMINUTE=30"], "Europe/Berlin", new Date("2026-03-27T12:00:00Z"), new Date("2026-03-31T12:00:00Z"), anchor);
    expect(iso(got)).toEqual([
      "2026-03-28T01:30:00.000Z", // 02:30 CET
      "2026-03-29T01:30:00.000Z", // 02:30 does not exist: 03:30 CEST
      "2026-03-30T00:30:00.000Z", // 02:30 CEST
      "2026-03-31T00:30:00.000Z",
    ]);
  });

  it("fires a time that fall-back repeats once, at its first instant", () => {
    // Europe/Berlin repeats 02:00-03:00 on 2026-10-25.
    const hourly = occurrencesBetween(["FREQ=HOURLY;BYMINUTE=30"], "Europe/Berlin", new Date("2026-10-24T22:00:00Z"), new Date("2026-10-25T03:00:00Z"), anchor);
    expect(iso(hourly)).toEqual([
      "2026-10-24T22:30:00.000Z", // 00:30 CEST
      "2026-10-24T23:30:00.000Z", // 01:30 CEST
      "2026-10-25T00:30:00.000Z", // 02:30 CEST, the first of the two 02:30s
      "2026-10-25T02:30:00.000Z", // 03:30 CET
    ]);
    const daily = occurrencesBetween(["FREQ=DAILY;BYHOUR=2;BYMINUTE=30"], "Europe/Berlin", new Date("2026-10-24T12:00:00Z"), new Date("2026-10-26T12:00:00Z"), anchor);
    expect(iso(daily)).toEqual(["2026-10-25T00:30:00.000Z", "2026-10-26T01:30:00.000Z"]);
  });

  it("skips months without the day asked for", () => {
    const got = occurrencesBetween(["FREQ=MONTHLY;BYMONTHDAY=31;BYHOUR=1;BYMINUTE=0"], "UTC", new Date("2026-01-01T00:00:00Z"), new Date("2026-08-01T00:00:00Z"), anchor);
    expect(iso(got)).toEqual(["2026-01-31T01:00:00.000Z", "2026-03-31T01:00:00.000Z", "2026-05-31T01:00:00.000Z", "2026-07-31T01:00:00.000Z"]);
  });

  it("takes the earliest of several rules and keeps INTERVAL counting from the anchor, however far away", () => {
    const rules = ["FREQ=WEEKLY;BYDAY=MO,WE,FR;BYHOUR=23;BYMINUTE=30", "FREQ=DAILY;BYHOUR=6;BYMINUTE=0"];
    expect(nextOccurrence(rules, "UTC", new Date("2026-11-23T07:00:00Z"), anchor)?.toISOString()).toBe("2026-11-23T23:30:00.000Z");
    expect(nextOccurrence(["FREQ=MINUTELY;INTERVAL=15"], "UTC", new Date("2031-05-05T10:07:00Z"), anchor)?.toISOString()).toBe("2031-05-05T10:15:00.000Z");
    expect(nextOccurrence(["FREQ=DAILY;INTERVAL=2;BYHOUR=0;BYMINUTE=0"], "UTC", new Date("2026-01-02T12:00:00Z"), anchor)?.toISOString()).toBe("2026-01-03T00:00:00.000Z");
    expect(nextOccurrence(["FREQ=MONTHLY;INTERVAL=3;BYMONTHDAY=1;BYHOUR=0;BYMINUTE=0"], "UTC", new Date("2029-02-10T00:00:00Z"), anchor)?.toISOString()).toBe("2029-04-01T00:00:00.000Z");
  });

  it("is strictly after the given instant and null once UNTIL has passed", () => {
    const at = new Date("2026-05-01T02:00:00Z");
    expect(nextOccurrence(["FREQ=DAILY;BYHOUR=2;BYMINUTE=0"], "UTC", at, anchor)?.toISOString()).toBe("2026-05-02T02:00:00.000Z");
    expect(nextOccurrence(["FREQ=DAILY;UNTIL=20260301T000000Z"], "UTC", at, anchor)).toBeNull();
  });
});

describe("parseRule", () => {
  it.each([
    ["", /empty/],
    ["FREQ=SECONDLY", /MINUTELY/],
    ["BYHOUR=2", /FREQ/],
    ["FREQ=DAILY;COUNT=5", /COUNT/],
    ["FREQ=DAILY;TZID=UTC", /TZID/],
    ["FREQ=DAILY;FOO=1", /FOO/],
    ["FREQ=NEVER", /FREQ must be/],
    ["FREQ=DAILY;INTERVAL=0", /INTERVAL/],
  ])("refuses %j", (rule, message) => {
    expect(() => parseRule(rule, 0)).toThrow(ScheduleError);
    expect(() => parseRule(rule, 0)).toThrow(message);
  });

  it("accepts the rules CBR users write, with or without the RRULE: prefix", () => {
    for (const rule of ["FREQ=DAILY;BYHOUR=2;BYMINUTE=0", "RRULE:FREQ=WEEKLY;BYDAY=MO,WE,FR;BYHOUR=23;BYMINUTE=30", "FREQ=MINUTELY"]) {
      expect(parseRule(rule, 0).freq).toBeDefined();
    }
  });

  it("knows IANA time zones", () => {
    expect(isValidTimezone("Europe/Berlin")).toBe(true);
    expect(isValidTimezone("UTC")).toBe(true);
    expect(isValidTimezone("Mars/Olympus")).toBe(false);
    expect(isValidTimezone("+02:00")).toBe(false);
    expect(isValidTimezone("")).toBe(false);
  });
});
