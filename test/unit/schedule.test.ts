import { checkSchedule, isValidTimezone, nextOccurrence, occurrencesBetween, parseRule, ScheduleError } from "../../src/domain/schedule";
import { runScheduleJobs, type ScheduleResult } from "../helpers/schedule-worker";

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

/** The message parseRule gives, or null when it accepts the rule. */
function refusal(rule: string): string | null {
  try {
    parseRule(rule, 0);
    return null;
  } catch (err) {
    if (!(err instanceof ScheduleError)) throw err;
    return err.message;
  }
}

describe("each RRULE part is range-checked", () => {
  // [rule, null when accepted or the message it is refused with]
  const cases: [string, string | RegExp | null][] = [
    ["FREQ=MINUTELY;BYSECOND=0", null],
    ["FREQ=MINUTELY;BYSECOND=59", null],
    ["FREQ=MINUTELY;BYSECOND=60", "BYSECOND=60 is out of range (0-59)"],
    ["FREQ=MINUTELY;BYSECOND=99", "BYSECOND=99 is out of range (0-59)"],
    ["FREQ=MINUTELY;BYSECOND=-1", "BYSECOND=-1 is out of range (0-59)"],
    ["FREQ=DAILY;BYMINUTE=0", null],
    ["FREQ=DAILY;BYMINUTE=59", null],
    ["FREQ=DAILY;BYMINUTE=60", "BYMINUTE=60 is out of range (0-59)"],
    ["FREQ=HOURLY;BYMINUTE=75", "BYMINUTE=75 is out of range (0-59)"],
    ["FREQ=DAILY;BYHOUR=0", null],
    ["FREQ=DAILY;BYHOUR=23", null],
    ["FREQ=DAILY;BYHOUR=24", "BYHOUR=24 is out of range (0-23)"],
    ["FREQ=DAILY;BYHOUR=25", "BYHOUR=25 is out of range (0-23)"],
    ["FREQ=DAILY;BYHOUR=2,25", "BYHOUR=25 is out of range (0-23)"],
    ["FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR,SA,SU", null],
    ["FREQ=WEEKLY;BYDAY=mo,Fr", null],
    ["FREQ=DAILY;BYDAY=XX", /^BYDAY=XX is not a weekday/],
    ["FREQ=DAILY;BYDAY=M", /^BYDAY=M is not a weekday/],
    ["FREQ=DAILY;BYDAY=MON", /^BYDAY=MON is not a weekday/],
    ["FREQ=DAILY;BYDAY=+MO", /^BYDAY=\+MO is not a weekday/],
    ["FREQ=DAILY;BYDAY=1MO", "BYDAY=1MO has an ordinal, which only FREQ=MONTHLY or FREQ=YEARLY allows"],
    ["FREQ=WEEKLY;BYDAY=-1FR", "BYDAY=-1FR has an ordinal, which only FREQ=MONTHLY or FREQ=YEARLY allows"],
    ["FREQ=MONTHLY;BYDAY=1MO", null],
    ["FREQ=MONTHLY;BYDAY=+5MO,-5FR", null],
    ["FREQ=MONTHLY;BYDAY=6MO", "BYDAY=6MO is out of range (ordinals 1 to 5 or -5 to -1 within a month)"],
    ["FREQ=MONTHLY;BYDAY=0MO", "BYDAY=0MO is out of range (ordinals 1 to 5 or -5 to -1 within a month)"],
    ["FREQ=YEARLY;BYMONTH=3;BYDAY=6MO", "BYDAY=6MO is out of range (ordinals 1 to 5 or -5 to -1 within a month)"],
    ["FREQ=YEARLY;BYDAY=53MO,-53SU", null],
    ["FREQ=YEARLY;BYDAY=54MO", "BYDAY=54MO is out of range (ordinals 1 to 53 or -53 to -1)"],
    ["FREQ=YEARLY;BYWEEKNO=20;BYDAY=1MO", "BYDAY=1MO has an ordinal, which BYWEEKNO does not allow"],
    ["FREQ=MONTHLY;BYMONTHDAY=1,31,-1,-31", null],
    ["FREQ=MONTHLY;BYMONTHDAY=+1", null],
    ["FREQ=MONTHLY;BYMONTHDAY=0", "BYMONTHDAY=0 is out of range (1 to 31 or -31 to -1)"],
    ["FREQ=MONTHLY;BYMONTHDAY=-0", "BYMONTHDAY=-0 is out of range (1 to 31 or -31 to -1)"],
    ["FREQ=MONTHLY;BYMONTHDAY=32", "BYMONTHDAY=32 is out of range (1 to 31 or -31 to -1)"],
    ["FREQ=MONTHLY;BYMONTHDAY=-32", "BYMONTHDAY=-32 is out of range (1 to 31 or -31 to -1)"],
    ["FREQ=YEARLY;BYYEARDAY=1,366,-1,-366", null],
    ["FREQ=YEARLY;BYYEARDAY=0", "BYYEARDAY=0 is out of range (1 to 366 or -366 to -1)"],
    ["FREQ=YEARLY;BYYEARDAY=367", "BYYEARDAY=367 is out of range (1 to 366 or -366 to -1)"],
    ["FREQ=YEARLY;BYYEARDAY=-367", "BYYEARDAY=-367 is out of range (1 to 366 or -366 to -1)"],
    ["FREQ=YEARLY;BYWEEKNO=1,53,-1,-53", null],
    ["FREQ=YEARLY;BYWEEKNO=0", "BYWEEKNO=0 is out of range (1 to 53 or -53 to -1)"],
    ["FREQ=YEARLY;BYWEEKNO=54", "BYWEEKNO=54 is out of range (1 to 53 or -53 to -1)"],
    ["FREQ=MONTHLY;BYMONTH=1,12", null],
    ["FREQ=MONTHLY;BYMONTH=0", "BYMONTH=0 is out of range (1-12)"],
    ["FREQ=MONTHLY;BYMONTH=13", "BYMONTH=13 is out of range (1-12)"],
    ["FREQ=YEARLY;BYYEARDAY=1,2;BYSETPOS=1,-1", null],
    ["FREQ=YEARLY;BYDAY=MO,TU,WE,TH,FR,SA,SU;BYSETPOS=366,-366", null],
    ["FREQ=MONTHLY;BYDAY=MO;BYSETPOS=-400", "BYSETPOS=-400 is out of range (1 to 366 or -366 to -1)"],
    ["FREQ=MONTHLY;BYDAY=MO;BYSETPOS=367", "BYSETPOS=367 is out of range (1 to 366 or -366 to -1)"],
    ["FREQ=MONTHLY;BYDAY=MO;BYSETPOS=0", "BYSETPOS=0 is out of range (1 to 366 or -366 to -1)"],
    ["FREQ=WEEKLY;BYDAY=MO,WE;WKST=SU", null],
    ["FREQ=WEEKLY;WKST=mo", null],
    ["FREQ=WEEKLY;WKST=XX", "WKST=XX is not a weekday (MO, TU, WE, TH, FR, SA or SU)"],
    ["FREQ=DAILY;INTERVAL=1", null],
    ["FREQ=DAILY;INTERVAL=1000", null],
    ["FREQ=DAILY;INTERVAL=0", "INTERVAL=0 is out of range (1-1000)"],
    ["FREQ=DAILY;INTERVAL=1001", "INTERVAL=1001 is out of range (1-1000)"],
    ["FREQ=YEARLY;INTERVAL=100", null],
    ["FREQ=YEARLY;INTERVAL=101", "INTERVAL=101 is out of range (1-100)"],
    ["FREQ=DAILY;UNTIL=20300101", null],
    ["FREQ=DAILY;UNTIL=20300101T235959", null],
    ["FREQ=DAILY;UNTIL=20300101T000000Z", null],
    ["FREQ=DAILY;UNTIL=20280229T000000Z", null],
    ["FREQ=DAILY;UNTIL=20270229T000000Z", /^UNTIL=20270229T000000Z is not a valid date-time/],
    ["FREQ=DAILY;UNTIL=20301301", /^UNTIL=20301301 is not a valid date-time/],
    ["FREQ=DAILY;UNTIL=20300100", /^UNTIL=20300100 is not a valid date-time/],
    ["FREQ=DAILY;UNTIL=20300101T240000", /^UNTIL=20300101T240000 is not a valid date-time/],
    ["FREQ=DAILY;UNTIL=20300101T006000", /^UNTIL=20300101T006000 is not a valid date-time/],
    ["FREQ=DAILY;UNTIL=19691231", /^UNTIL=19691231 is not a valid date-time/],
    ["FREQ=DAILY;UNTIL=2030010", /^UNTIL=2030010 is not a date/],
    ["FREQ=DAILY;UNTIL=20300101T0000", /^UNTIL=20300101T0000 is not a date/],
    ["FREQ=DAILY;UNTIL=20300101T000000X", /^UNTIL=20300101T000000X is not a date/],
    ["FREQ=DAILY;COUNT=5", "COUNT is not supported in a schedule; use UNTIL"],
    ["FREQ=YEARLY", null],
    ["FREQ=MONTHLY", null],
    ["FREQ=WEEKLY", null],
    ["FREQ=DAILY", null],
    ["FREQ=HOURLY", null],
    ["FREQ=MINUTELY", null],
    ["freq=minutely", null],
    ["FREQ=SECONDLY", "FREQ=SECONDLY is too frequent; the finest is MINUTELY"],
    ["FREQ=NEVER", /^FREQ=NEVER is not a frequency: FREQ must be/],
  ];
  it.each(cases)("%j", (rule, expected) => {
    if (expected === null) expect(refusal(rule)).toBeNull();
    else if (typeof expected === "string") expect(refusal(rule)).toBe(expected);
    else expect(refusal(rule)).toMatch(expected);
  });
});

describe("malformed rules are refused, naming what is wrong", () => {
  const cases: [string, string | RegExp][] = [
    ["FREQ=DAILY;FOO=1", 'unknown rule part "FOO"'],
    ["FREQ=DAILY;BYEASTER=1", 'unknown rule part "BYEASTER"'],
    ["FREQ=DAILY;FREQ=WEEKLY", "FREQ appears twice"],
    ["FREQ=DAILY;BYHOUR=1;byhour=2", "BYHOUR appears twice"],
    ["FREQ=DAILY;;BYHOUR=2", 'has an empty part; join PART=VALUE pairs with a single ";"'],
    ["FREQ=DAILY;", 'has an empty part; join PART=VALUE pairs with a single ";"'],
    [";FREQ=DAILY", 'has an empty part; join PART=VALUE pairs with a single ";"'],
    ["FREQ=DAILY;BYHOUR", "BYHOUR has no value; write BYHOUR=…"],
    ["FREQ=DAILY;BYHOUR=", "BYHOUR has an empty value"],
    ["FREQ=", "FREQ has an empty value"],
    ["FREQ=DAILY;BYHOUR=1,,2", "BYHOUR=1,,2 has an empty value"],
    ["FREQ=DAILY;BYHOUR=1,", "BYHOUR=1, has an empty value"],
    ["FREQ=DAILY;BYHOUR=2=3", "BYHOUR=2=3 is not an integer"],
    ["FREQ=DAILY=2", /^FREQ=DAILY=2 is not a frequency/],
    ["FREQ=DAILY;BYHOUR=two", "BYHOUR=two is not an integer"],
    ["FREQ=DAILY;BYHOUR=1e1", "BYHOUR=1e1 is not an integer"],
    ["FREQ=DAILY;BYHOUR=+2", "BYHOUR=+2 takes no sign"],
    ["FREQ=DAILY;BYHOUR=-0", "BYHOUR=-0 is out of range (0-23)"],
    ["FREQ=DAILY;BYHOUR=007", "BYHOUR=007 has more than 2 digits"],
    ["FREQ=DAILY;INTERVAL=+1", "INTERVAL=+1 takes no sign"],
    ["FREQ=DAILY;INTERVAL=99999999999999999999999", "INTERVAL=99999999999999999999999 is out of range (1-1000)"],
    ["FREQ=MONTHLY;BYMONTHDAY=++1", "BYMONTHDAY=++1 is not an integer"],
    ["FREQ=MONTHLY;BYMONTHDAY=+-1", "BYMONTHDAY=+-1 is not an integer"],
    ["FREQ=MONTHLY;BYMONTHDAY=1+", "BYMONTHDAY=1+ is not an integer"],
    ["FREQ=DAILY;BYHOUR=2,2", "BYHOUR lists 2 twice"],
    ["FREQ=DAILY;BYHOUR=2,02", "BYHOUR lists 2 twice"],
    ["FREQ=WEEKLY;BYDAY=MO,mo", "BYDAY lists mo twice"],
    [`FREQ=YEARLY;BYYEARDAY=${Array.from({ length: 61 }, (_, i) => i + 1).join(",")}`, "BYYEARDAY lists 61 values; at most 60"],
    [`FREQ=YEARLY;BYYEARDAY=${"1".repeat(600)}`, "is longer than 500 characters"],
    ["FREQ=DAILY; BYHOUR=2", /^has a space at position 12; /],
    ["FREQ=DAILY;BYHOUR=2 ;BYMINUTE=0", /^has a space at position 20; /],
    ["FREQ=DAILY;\tBYHOUR=2", /^has the control character U\+0009 at position 12; /],
    ["FREQ=DAILY\u0000", /^has the control character U\+0000 at position 11; /],
    ["FREQ=DAILY;BYHOUR=\ud800", /^has the lone surrogate U\+D800 at position 19; /],
    ["FREQ=DAILY;BYHOUR=2\u00a0", /^has the character U\+00A0 at position 20; /],
    ["FREQ=DAILY;BYHOUR=\u{1F600}", /^has the character U\+1F600 at position 19; /],
    ['FREQ=DAILY;BYHOUR="2"', /^has """ at position 19; /],
    ["RRULE:RRULE:FREQ=DAILY", /^has ":" at position 12; /],
    ["FREQ=DAILY;DTSTART=20260101T000000Z", "DTSTART is not part of a rule; the policy's timezone applies"],
    ["BYHOUR=2", "needs FREQ"],
    ["RRULE:", "is empty"],
    ["  ", "is empty"],
  ];
  it.each(cases)("%j", (rule, expected) => {
    if (typeof expected === "string") expect(refusal(rule)).toBe(expected);
    else expect(refusal(rule)).toMatch(expected);
  });

  it("keeps long values out of its messages", () => {
    expect(refusal(`FREQ=DAILY;BYHOUR=${"9".repeat(300)}`)).toBe(`BYHOUR=${"9".repeat(40)}… is out of range (0-23)`);
  });

  it("forgives spaces around a rule and an RRULE: prefix, and stores the rule without them", () => {
    expect(checkSchedule([" FREQ=DAILY;BYHOUR=2 \n", "\trrule:FREQ=WEEKLY;BYDAY=MO\r\n"])).toEqual(["FREQ=DAILY;BYHOUR=2", "FREQ=WEEKLY;BYDAY=MO"]);
  });
});

describe("rules that could never fire, or fire more than once a minute, are refused", () => {
  const cases: [string, string | RegExp][] = [
    ["FREQ=MINUTELY;BYSECOND=0,30", "BYSECOND=0,30 fires more than once a minute; give one second (0-59)"],
    [`FREQ=MINUTELY;BYSECOND=${Array.from({ length: 60 }, (_, i) => i).join(",")}`, /^BYSECOND=0,1,2,.* fires more than once a minute/],
    ["FREQ=DAILY;BYHOUR=2;BYSECOND=0,1", "BYSECOND=0,1 fires more than once a minute; give one second (0-59)"],
    [
      "FREQ=HOURLY;INTERVAL=2;BYHOUR=1,3",
      /^never fires: counted from midnight, FREQ=HOURLY;INTERVAL=2 reaches only times of day a multiple of 2 h apart \(00:00, 02:00, …\), and BYHOUR=1,3 allows none of them$/,
    ],
    ["FREQ=HOURLY;INTERVAL=24;BYHOUR=5", /^never fires: .*INTERVAL=24 .*BYHOUR=5/],
    ["FREQ=MINUTELY;INTERVAL=15;BYMINUTE=10", /^never fires: .*multiple of 15 min apart \(00:00, 00:15, …\), and BYMINUTE=10 allows none of them$/],
    ["FREQ=MINUTELY;INTERVAL=120;BYHOUR=1", /^never fires: .*multiple of 2 h apart/],
    ["FREQ=MINUTELY;INTERVAL=45;BYHOUR=9", "INTERVAL=45 does not go with BYHOUR under FREQ=MINUTELY; use an INTERVAL that divides 60 or is a multiple of 60"],
    ["FREQ=DAILY;INTERVAL=7;BYDAY=MO", /^FREQ=DAILY;INTERVAL=7 counts from the day the policy is created and meets BYDAY=MO only when that is certain weekdays/],
    ["FREQ=HOURLY;INTERVAL=7;BYHOUR=1;BYDAY=MO,TU", /^FREQ=HOURLY;INTERVAL=7 counts from the day the policy is created/],
    ["FREQ=MINUTELY;INTERVAL=420;BYHOUR=1;BYDAY=SA", /^FREQ=MINUTELY;INTERVAL=420 counts from the day the policy is created/],
    ["FREQ=DAILY;BYHOUR=1,2;BYSETPOS=3", "BYSETPOS=3 picks nothing: each day has 2 times to pick from"],
    ["FREQ=WEEKLY;BYDAY=MO,TU;BYSETPOS=-3", "BYSETPOS=-3 picks nothing: each week has 2 times to pick from"],
    ["FREQ=HOURLY;BYMINUTE=0,30;BYSETPOS=3", "BYSETPOS=3 picks nothing: each hour has 2 times to pick from"],
    ["FREQ=MINUTELY;BYSECOND=5;BYSETPOS=2", "BYSETPOS=2 picks nothing: each minute has 1 time to pick from"],
    ["FREQ=DAILY;BYSETPOS=1", "BYSETPOS needs another BY… part to pick from"],
    ["FREQ=DAILY;BYWEEKNO=1", "BYWEEKNO only goes with FREQ=YEARLY, not FREQ=DAILY"],
    ["FREQ=MONTHLY;BYYEARDAY=1", "BYYEARDAY does not go with FREQ=MONTHLY"],
    ["FREQ=WEEKLY;BYMONTHDAY=1", "BYMONTHDAY does not go with FREQ=WEEKLY"],
  ];
  it.each(cases)("%j", (rule, expected) => {
    if (typeof expected === "string") expect(refusal(rule)).toBe(expected);
    else expect(refusal(rule)).toMatch(expected);
  });

  it.each([
    "FREQ=HOURLY;INTERVAL=2;BYHOUR=0,22",
    "FREQ=HOURLY;INTERVAL=5;BYHOUR=3",
    "FREQ=MINUTELY;INTERVAL=15;BYHOUR=9,10,11,12,13,14,15,16,17;BYDAY=MO,TU,WE,TH,FR",
    "FREQ=MINUTELY;INTERVAL=45;BYMINUTE=30",
    "FREQ=MINUTELY;INTERVAL=7;BYMINUTE=3",
    "FREQ=DAILY;INTERVAL=7;BYDAY=MO,TU,WE,TH,FR,SA,SU",
    "FREQ=DAILY;INTERVAL=2;BYDAY=MO",
    "FREQ=HOURLY;INTERVAL=7;BYDAY=MO",
    "FREQ=MINUTELY;BYSECOND=5;BYSETPOS=-1",
    "FREQ=MONTHLY;BYDAY=MO,TU;BYSETPOS=-1",
  ])("accepts %j, which fires", (rule) => {
    expect(refusal(rule)).toBeNull();
    expect(nextOccurrence([rule], "UTC", new Date("2026-06-10T12:34:56Z"), anchor)).not.toBeNull();
  });

  it.each([
    ["FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30", "never fires: no date matches BYMONTH, BYMONTHDAY together"],
    ["FREQ=MINUTELY;BYMONTH=4,6,9,11;BYMONTHDAY=31", "never fires: no date matches BYMONTH, BYMONTHDAY together"],
    ["FREQ=YEARLY;BYWEEKNO=1;BYMONTH=6", "never fires: no date matches BYMONTH, BYWEEKNO together"],
    ["FREQ=HOURLY;BYYEARDAY=1;BYMONTHDAY=2", "never fires: no date matches BYYEARDAY, BYMONTHDAY together"],
    ["FREQ=MONTHLY;BYDAY=5MO;BYSETPOS=2", "never fires: no date matches BYDAY, BYSETPOS together"],
  ])("checkSchedule refuses %j, whose days never come", (rule, message) => {
    expect(refusal(rule)).toBeNull();
    expect(() => checkSchedule([rule])).toThrow(message);
  });

  it("checkSchedule accepts days that come only once in decades", () => {
    expect(checkSchedule(["FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29;BYDAY=MO"])).toHaveLength(1);
    expect(nextOccurrence(["FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=29;BYDAY=MO"], "UTC", new Date("2026-06-10T00:00:00Z"), anchor)?.toISOString()).toBe("2044-02-29T00:00:00.000Z");
  });

  it("checkSchedule wants every rule of a schedule on one second, and names the rule that is not", () => {
    expect(checkSchedule(["FREQ=DAILY;BYHOUR=2", "FREQ=HOURLY;BYSECOND=0"])).toHaveLength(2);
    expect(checkSchedule(["FREQ=DAILY;BYSECOND=30", "FREQ=HOURLY;BYSECOND=30"])).toHaveLength(2);
    let err: unknown;
    try {
      checkSchedule(["FREQ=MINUTELY", "FREQ=MINUTELY;BYSECOND=30"]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ScheduleError);
    expect((err as ScheduleError).index).toBe(1);
    expect((err as ScheduleError).message).toBe("fires at second 30 of a minute, the rules before it at second 0; a schedule fires at most once a minute, so its rules share one second");
  });
});

describe("steps that rrule alone would get wrong or never finish", () => {
  const start = "2026-06-01T00:00:00Z";
  // In a worker under a watchdog: rrule alone loops forever on some of these.
  const cases: [string, string, string, string, string[]][] = [
    // Every minute of 01:00 on Tuesdays, from a Monday.
    ["FREQ=MINUTELY;BYHOUR=1;BYDAY=TU", "UTC", "2026-06-08T00:00:00Z", "2026-06-09T01:02:00Z", ["2026-06-09T01:00:00.000Z", "2026-06-09T01:01:00.000Z", "2026-06-09T01:02:00.000Z"]],
    // Every 15 minutes in business hours on weekdays: Friday 16:45, then Monday 09:00 CEST.
    [
      "FREQ=MINUTELY;INTERVAL=15;BYHOUR=9,10,11,12,13,14,15,16;BYDAY=MO,TU,WE,TH,FR",
      "Europe/Berlin",
      "2026-06-12T14:40:00Z",
      "2026-06-15T07:20:00Z",
      ["2026-06-12T14:45:00.000Z", "2026-06-15T07:00:00.000Z", "2026-06-15T07:15:00.000Z"],
    ],
    // Every 2 hours from midnight, only at 02:00 and 04:00 in February.
    [
      "FREQ=MINUTELY;INTERVAL=120;BYHOUR=2,4;BYMONTH=2",
      "UTC",
      "2026-06-08T00:00:00Z",
      "2027-02-02T12:00:00Z",
      ["2027-02-01T02:00:00.000Z", "2027-02-01T04:00:00.000Z", "2027-02-02T02:00:00.000Z", "2027-02-02T04:00:00.000Z"],
    ],
    // Every 45 minutes from midnight: 01:30, 04:30, … are the ones at minute 30.
    ["FREQ=MINUTELY;INTERVAL=45;BYMINUTE=30", "UTC", start, "2026-06-01T08:00:00Z", ["2026-06-01T01:30:00.000Z", "2026-06-01T04:30:00.000Z", "2026-06-01T07:30:00.000Z"]],
  ];
  let results: ScheduleResult[];
  beforeAll(async () => {
    results = await runScheduleJobs(
      cases.map(([rule, tz, at, to]) => ({ schedule: [rule], mode: "occurrences", tz, at, to, anchor: start })),
      10_000,
    );
  });

  it.each(cases.map((c, i) => [c[0], i] as const))("%s fires on its count from midnight", (_, i) => {
    expect(results[i]).toMatchObject({ ok: true, occurrences: cases[i][4] });
  });

  it("gives up on a rule that matches no date within a few seconds, not at year 9999", () => {
    const t = Date.now();
    expect(nextOccurrence(["FREQ=DAILY;BYMONTH=2;BYMONTHDAY=30"], "UTC", new Date("2026-06-08T00:00:00Z"), new Date(start))).toBeNull();
    expect(Date.now() - t).toBeLessThan(10_000);
  });
});
