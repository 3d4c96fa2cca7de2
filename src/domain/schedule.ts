import { DateTime, IANAZone } from "luxon";
import { Frequency, RRule, Weekday, type Options } from "rrule";

/**
 * Policy schedules: iCalendar RRULEs read in an IANA time zone.
 *
 * rrule computes in "floating" time: wall-clock fields stored in a UTC Date. Each
 * occurrence is then placed in the policy's zone by luxon, which moves a time that
 * a DST change skips to the next valid instant; a repeated time gets its first
 * instant, so every wall-clock occurrence fires once.
 *
 * Rules are read and range-checked here, part by part, before rrule sees them: rrule
 * wraps out-of-range numbers silently, throws TypeErrors on bad weekdays, and loops
 * forever on some steps that never reach their BYHOUR or BYMINUTE.
 */

export class ScheduleError extends Error {
  constructor(
    readonly index: number,
    message: string,
  ) {
    super(message);
  }
}

export const MAX_RULES = 24;
const MAX_LENGTH = 500;
const MAX_VALUES = 60;

const FREQUENCIES = new Map([
  ["YEARLY", Frequency.YEARLY],
  ["MONTHLY", Frequency.MONTHLY],
  ["WEEKLY", Frequency.WEEKLY],
  ["DAILY", Frequency.DAILY],
  ["HOURLY", Frequency.HOURLY],
  ["MINUTELY", Frequency.MINUTELY],
]);
const FREQ_NAMES = ["YEARLY", "MONTHLY", "WEEKLY", "DAILY", "HOURLY", "MINUTELY"];
/** In rrule's numbering: 0 is Monday. */
const WEEKDAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"];

/** Number-list parts: range, and the digits RFC 5545 allows; signed ones count back from the end with a minus. */
const NUMBER_LISTS = {
  BYSECOND: { min: 0, max: 59, digits: 2, signed: false },
  BYMINUTE: { min: 0, max: 59, digits: 2, signed: false },
  BYHOUR: { min: 0, max: 23, digits: 2, signed: false },
  BYMONTHDAY: { min: 1, max: 31, digits: 2, signed: true },
  BYYEARDAY: { min: 1, max: 366, digits: 3, signed: true },
  BYWEEKNO: { min: 1, max: 53, digits: 2, signed: true },
  BYMONTH: { min: 1, max: 12, digits: 2, signed: false },
  BYSETPOS: { min: 1, max: 366, digits: 3, signed: true },
} as const;
type NumberList = keyof typeof NUMBER_LISTS;
interface NumberSpec {
  min: number;
  max: number;
  digits: number;
  signed: boolean;
}

const PARTS = new Set(["FREQ", "INTERVAL", "UNTIL", "BYDAY", "WKST", ...Object.keys(NUMBER_LISTS)]);

/** A rule as read: absent parts are null; `until` is wall-clock time in floating UTC. */
export interface Rule {
  freq: Frequency;
  interval: number;
  until: Date | null;
  bysecond: number[] | null;
  byminute: number[] | null;
  byhour: number[] | null;
  byday: { weekday: number; n: number }[] | null;
  bymonthday: number[] | null;
  byyearday: number[] | null;
  byweekno: number[] | null;
  bymonth: number[] | null;
  bysetpos: number[] | null;
  wkst: number | null;
}

export function isValidTimezone(tz: string): boolean {
  return typeof tz === "string" && tz.length > 0 && IANAZone.isValidZone(tz) && tz !== "" && !/^[+-]/.test(tz);
}

const gcd = (a: number, b: number): number => (b ? gcd(b, a % b) : a);

/** A value as it may appear in a message: printable by now, but cut when long. */
const clip = (value: string) => (value.length > 40 ? `${value.slice(0, 40)}…` : value);

function describeChar(text: string, i: number): string {
  const code = text.codePointAt(i)!;
  if (code === 0x20) return "a space";
  if (code > 0x20 && code < 0x7f) return `"${text[i]}"`;
  const hex = `U+${code.toString(16).toUpperCase().padStart(4, "0")}`;
  if (code < 0x20 || code === 0x7f) return `the control character ${hex}`;
  if (code >= 0xd800 && code <= 0xdfff) return `the lone surrogate ${hex}`;
  return `the character ${hex}`;
}

const isEdgeSpace = (c: string) => c === " " || c === "\t" || c === "\r" || c === "\n";

/** The rule without surrounding spaces or an RRULE: prefix, as it is stored; `start` is where it begins in `text`. */
function ruleBody(text: string): { body: string; start: number } {
  let start = 0;
  let end = text.length;
  while (start < end && isEdgeSpace(text[start])) start++;
  while (end > start && isEdgeSpace(text[end - 1])) end--;
  if (/^RRULE:/i.test(text.slice(start, start + 6))) start += 6;
  return { body: text.slice(start, end), start };
}

/** Reads one rule; throws ScheduleError naming the part and value at fault. */
export function parseRule(text: string, index: number): Rule {
  const fail = (message: string): never => {
    throw new ScheduleError(index, message);
  };
  if (typeof text !== "string") fail("is not a string");
  const { body, start } = ruleBody(text);
  if (!body) fail("is empty");
  if (body.length > MAX_LENGTH) fail(`is longer than ${MAX_LENGTH} characters`);
  const stray = /[^A-Za-z0-9=;,+-]/.exec(body);
  if (stray) fail(`has ${describeChar(body, stray.index)} at position ${start + stray.index + 1}; a rule is PART=VALUE pairs joined by ";", e.g. FREQ=DAILY;BYHOUR=2;BYMINUTE=0`);

  const values = new Map<string, string>();
  for (const part of body.split(";")) {
    if (!part) fail('has an empty part; join PART=VALUE pairs with a single ";"');
    const eq = part.indexOf("=");
    const key = (eq < 0 ? part : part.slice(0, eq)).toUpperCase();
    if (key === "COUNT") fail("COUNT is not supported in a schedule; use UNTIL");
    if (key === "DTSTART" || key === "TZID") fail(`${key} is not part of a rule; the policy's timezone applies`);
    if (!PARTS.has(key)) fail(`unknown rule part "${clip(key)}"`);
    if (eq < 0) fail(`${key} has no value; write ${key}=…`);
    if (values.has(key)) fail(`${key} appears twice`);
    const value = part.slice(eq + 1);
    if (!value) fail(`${key} has an empty value`);
    values.set(key, value);
  }

  const readInt = (key: string, item: string, spec: NumberSpec): number => {
    const m = /^([+-]?)(\d+)$/.exec(item);
    if (!m) return fail(item ? `${key}=${clip(item)} is not an integer` : `${key}=${clip(values.get(key)!)} has an empty value`);
    const range = spec.signed ? `${spec.min} to ${spec.max} or -${spec.max} to -${spec.min}` : `${spec.min}-${spec.max}`;
    const magnitude = Number(m[2]);
    if (m[1] === "+" && !spec.signed) fail(`${key}=${item} takes no sign`);
    if ((m[1] === "-" && !spec.signed) || magnitude < spec.min || magnitude > spec.max) fail(`${key}=${clip(item)} is out of range (${range})`);
    if (m[2].length > spec.digits) fail(`${key}=${clip(item)} has more than ${spec.digits} digits`);
    return m[1] === "-" ? -magnitude : magnitude;
  };
  const readList = (key: NumberList): number[] | null => {
    const value = values.get(key);
    if (value === undefined) return null;
    const items = value.split(",");
    if (items.length > MAX_VALUES) fail(`${key} lists ${items.length} values; at most ${MAX_VALUES}`);
    const out: number[] = [];
    for (const item of items) {
      const n = readInt(key, item, NUMBER_LISTS[key]);
      if (out.includes(n)) fail(`${key} lists ${n} twice`);
      out.push(n);
    }
    return out;
  };

  const freqText = values.get("FREQ");
  if (freqText === undefined) return fail("needs FREQ");
  if (freqText.toUpperCase() === "SECONDLY") fail("FREQ=SECONDLY is too frequent; the finest is MINUTELY");
  const freq = FREQUENCIES.get(freqText.toUpperCase());
  if (freq === undefined) return fail(`FREQ=${clip(freqText)} is not a frequency: FREQ must be YEARLY, MONTHLY, WEEKLY, DAILY, HOURLY or MINUTELY`);
  const freqName = FREQ_NAMES[freq];

  // Up to a century a step: a rule that fires less often than that is not a backup schedule.
  const maxInterval = freq === Frequency.YEARLY ? 100 : 1000;
  const intervalText = values.get("INTERVAL");
  const interval = intervalText === undefined ? 1 : readInt("INTERVAL", intervalText, { min: 1, max: maxInterval, digits: 4, signed: false });

  const rule: Rule = {
    freq,
    interval,
    until: null,
    bysecond: readList("BYSECOND"),
    byminute: readList("BYMINUTE"),
    byhour: readList("BYHOUR"),
    byday: null,
    bymonthday: readList("BYMONTHDAY"),
    byyearday: readList("BYYEARDAY"),
    byweekno: readList("BYWEEKNO"),
    bymonth: readList("BYMONTH"),
    bysetpos: readList("BYSETPOS"),
    wkst: null,
  };

  const untilText = values.get("UNTIL");
  if (untilText !== undefined) {
    const m = /^(\d{4})(\d{2})(\d{2})(?:T(\d{2})(\d{2})(\d{2})Z?)?$/.exec(untilText.toUpperCase());
    if (!m) fail(`UNTIL=${clip(untilText)} is not a date (YYYYMMDD) or date-time (YYYYMMDDTHHMMSS, optionally with Z)`);
    const [y, mo, d, h, mi, s] = m!.slice(1).map((x) => Number(x ?? 0));
    const daysInMonth = new Date(Date.UTC(y, mo, 0)).getUTCDate();
    if (y < 1970 || mo < 1 || mo > 12 || d < 1 || d > daysInMonth || h > 23 || mi > 59 || s > 59) fail(`UNTIL=${untilText} is not a valid date-time (years 1970-9999)`);
    rule.until = new Date(Date.UTC(y, mo - 1, d, h, mi, s));
  }

  const wkstText = values.get("WKST");
  if (wkstText !== undefined) {
    rule.wkst = WEEKDAYS.indexOf(wkstText.toUpperCase());
    if (rule.wkst < 0) fail(`WKST=${clip(wkstText)} is not a weekday (MO, TU, WE, TH, FR, SA or SU)`);
  }

  const bydayText = values.get("BYDAY");
  if (bydayText !== undefined) {
    const items = bydayText.split(",");
    if (items.length > MAX_VALUES) fail(`BYDAY lists ${items.length} values; at most ${MAX_VALUES}`);
    // Within a month (MONTHLY, or YEARLY with BYMONTH) there are at most five of a weekday.
    const maxOrdinal = freq === Frequency.MONTHLY || rule.bymonth ? 5 : 53;
    const days: { weekday: number; n: number }[] = [];
    for (const item of items) {
      if (!item) fail(`BYDAY=${clip(bydayText)} has an empty value`);
      const m = /^([+-]?)(\d*)([A-Z]*)$/.exec(item.toUpperCase());
      const weekday = m ? WEEKDAYS.indexOf(m[3]) : -1;
      if (!m || weekday < 0 || (m[1] && !m[2])) return fail(`BYDAY=${clip(item)} is not a weekday (MO, TU, WE, TH, FR, SA or SU, after an ordinal such as 1MO or -1FR if any)`);
      let n = 0;
      if (m[2]) {
        if (freq !== Frequency.MONTHLY && freq !== Frequency.YEARLY) fail(`BYDAY=${item} has an ordinal, which only FREQ=MONTHLY or FREQ=YEARLY allows`);
        if (rule.byweekno) fail(`BYDAY=${item} has an ordinal, which BYWEEKNO does not allow`);
        n = Number(m[2]);
        if (n < 1 || n > maxOrdinal || m[2].length > 2) fail(`BYDAY=${clip(item)} is out of range (ordinals 1 to ${maxOrdinal} or -${maxOrdinal} to -1${maxOrdinal === 5 ? " within a month" : ""})`);
        if (m[1] === "-") n = -n;
      }
      if (days.some((x) => x.weekday === weekday && x.n === n)) fail(`BYDAY lists ${item} twice`);
      days.push({ weekday, n });
    }
    rule.byday = days;
  }

  // The limits RFC 5545 puts on which parts go with which FREQ.
  if (rule.byweekno && freq !== Frequency.YEARLY) fail(`BYWEEKNO only goes with FREQ=YEARLY, not FREQ=${freqName}`);
  if (rule.byyearday && (freq === Frequency.DAILY || freq === Frequency.WEEKLY || freq === Frequency.MONTHLY)) fail(`BYYEARDAY does not go with FREQ=${freqName}`);
  if (rule.bymonthday && freq === Frequency.WEEKLY) fail("BYMONTHDAY does not go with FREQ=WEEKLY");
  if (rule.bysetpos && ![...values.keys()].some((k) => k.startsWith("BY") && k !== "BYSETPOS")) fail("BYSETPOS needs another BY… part to pick from");

  // A schedule fires at most once a minute (FREQ=MINUTELY), so one second.
  if (rule.bysecond && rule.bysecond.length > 1) fail(`BYSECOND=${clip(values.get("BYSECOND")!)} fires more than once a minute; give one second (0-59)`);

  checkSteps(rule, freqName, values, fail);
  return rule;
}

const DAY_MINUTES = 1440;
const WEEK_MINUTES = 7 * DAY_MINUTES;

/** The step of a DAILY, HOURLY or MINUTELY rule in minutes; 0 for the calendar frequencies. */
function stepMinutes(rule: Rule): number {
  const unit = rule.freq === Frequency.DAILY ? DAY_MINUTES : rule.freq === Frequency.HOURLY ? 60 : rule.freq === Frequency.MINUTELY ? 1 : 0;
  return unit * rule.interval;
}

/**
 * Whether a DAILY, HOURLY or MINUTELY rule's steps ever land on its BYHOUR and BYMINUTE
 * and, given the weekday (0 is Monday) of the day it counts from, on its BYDAY. Every
 * rule counts from midnight of the day the policy was created, so its steps reach the
 * times of the week that are multiples of gcd(step, a week) from there; rrule loops
 * forever on a BYHOUR or BYMINUTE that no step reaches.
 */
function reachesGrid(rule: Rule, startWeekday: number | null): boolean {
  const step = stepMinutes(rule);
  if (!step) return true;
  const byday = startWeekday === null ? null : rule.byday;
  const span = byday ? WEEK_MINUTES : DAY_MINUTES;
  const g = gcd(step, span);
  // The first reachable time at or after `t`: a day or hour that is not allowed is skipped whole.
  const from = (t: number) => Math.ceil(t / g) * g;
  for (let t = 0; t < span;) {
    const day = Math.floor(t / DAY_MINUTES);
    const hour = Math.floor((t % DAY_MINUTES) / 60);
    if (byday && !byday.some((d) => d.weekday === (startWeekday! + day) % 7)) t = from((day + 1) * DAY_MINUTES);
    else if (rule.freq === Frequency.DAILY) return true;
    else if (rule.byhour && !rule.byhour.includes(hour)) t = from(day * DAY_MINUTES + (hour + 1) * 60);
    else if (rule.freq === Frequency.MINUTELY && rule.byminute && !rule.byminute.includes(t % 60)) t += g;
    else return true;
  }
  return false;
}

const duration = (minutes: number) => (minutes % 60 ? (minutes > 60 ? `${Math.floor(minutes / 60)} h ${minutes % 60} min` : `${minutes} min`) : `${minutes / 60} h`);

/** Refuses steps that can never fire, or fire only for some creation days, and BYSETPOS positions no set has. */
function checkSteps(rule: Rule, freqName: string, values: Map<string, string>, fail: (message: string) => never): void {
  const step = stepMinutes(rule);
  const stepText = `FREQ=${freqName}${rule.interval > 1 ? `;INTERVAL=${rule.interval}` : ""}`;
  // rrule restarts such a step at each hour BYHOUR skips, so its times would drift from the count.
  if (rule.freq === Frequency.MINUTELY && rule.byhour && 60 % rule.interval !== 0 && rule.interval % 60 !== 0) {
    fail(`INTERVAL=${rule.interval} does not go with BYHOUR under FREQ=MINUTELY; use an INTERVAL that divides 60 or is a multiple of 60`);
  }
  if (!reachesGrid(rule, null)) {
    const g = gcd(step, DAY_MINUTES);
    const limits = ["BYHOUR", "BYMINUTE"].filter((k) => values.has(k) && (k === "BYHOUR" || rule.freq === Frequency.MINUTELY)).map((k) => `${k}=${clip(values.get(k)!)}`);
    fail(
      `never fires: counted from midnight, ${stepText} reaches only times of day a multiple of ${duration(g)} apart (00:00, ${String(Math.floor(g / 60)).padStart(2, "0")}:${String(g % 60).padStart(2, "0")}, …), and ${limits.join(";")} allows none of them`,
    );
  }
  for (let weekday = 0; weekday < 7; weekday++) {
    if (!reachesGrid(rule, weekday)) {
      fail(
        `${stepText} counts from the day the policy is created and meets BYDAY=${clip(values.get("BYDAY")!)} only when that is certain weekdays; use an INTERVAL that is not a multiple of 7${rule.freq === Frequency.DAILY ? ", or FREQ=WEEKLY" : ""}`,
      );
    }
  }
  if (rule.bysetpos) {
    // The sets BYSETPOS picks from have a fixed size below MONTHLY; a MONTHLY or YEARLY one is tried on the calendar.
    const count = (list: unknown[] | null) => list?.length ?? 1;
    const times = count(rule.byhour) * count(rule.byminute) * count(rule.bysecond);
    const sizes: Partial<Record<Frequency, [number, string]>> = {
      [Frequency.MINUTELY]: [count(rule.bysecond), "minute"],
      [Frequency.HOURLY]: [count(rule.byminute) * count(rule.bysecond), "hour"],
      [Frequency.DAILY]: [times, "day"],
      [Frequency.WEEKLY]: [count(rule.byday) * times, "week"],
    };
    const size = sizes[rule.freq];
    if (size && rule.bysetpos.every((n) => Math.abs(n) > size[0])) {
      fail(`BYSETPOS=${clip(values.get("BYSETPOS")!)} picks nothing: each ${size[1]} has ${size[0]} time${size[0] === 1 ? "" : "s"} to pick from`);
    }
  }
}

const ALL_MINUTES = Array.from({ length: 60 }, (_, i) => i);

/** rrule's options for a rule read by parseRule. */
function toOptions(rule: Rule): Partial<Options> {
  const options: Partial<Options> = {
    freq: rule.freq,
    interval: rule.interval,
    until: rule.until,
    wkst: rule.wkst,
    bysecond: rule.bysecond,
    byminute: rule.byminute,
    byhour: rule.byhour,
    byweekday: rule.byday && rule.byday.map((d) => (d.n ? new Weekday(d.weekday, d.n) : d.weekday)),
    bymonthday: rule.bymonthday,
    byyearday: rule.byyearday,
    byweekno: rule.byweekno,
    bymonth: rule.bymonth,
    bysetpos: rule.bysetpos,
  };
  if (rule.freq === Frequency.MINUTELY) {
    // rrule's MINUTELY leaves its step, or loops forever, when BYHOUR meets a day it skips
    // over; HOURLY with the minutes of the step gives the same times, counted from midnight.
    const step = rule.interval;
    if (60 % step === 0) Object.assign(options, { freq: Frequency.HOURLY, interval: 1, byminute: (rule.byminute ?? ALL_MINUTES).filter((m) => m % step === 0) });
    else if (step % 60 === 0) Object.assign(options, { freq: Frequency.HOURLY, interval: step / 60, byminute: [0] });
    // A minute has one time, and BYSETPOS (1 or -1 by now) picks it.
    options.bysetpos = null;
  }
  return options;
}

/**
 * The last 28 years before rrule stops at year 9999. Which days of a year match depends
 * only on whether it and the year before are leap years and the weekday it starts on,
 * and 28 years without a century year between them hold every such combination (the
 * 400-year cycle did too, but walking it held the event loop for a tenth of a second).
 */
const PROBE_FROM = new Date(Date.UTC(9972, 0, 1));

/**
 * Whether the rule's day parts match any date at all, tried over every kind of year:
 * as a YEARLY rule, or as itself when ordinals or BYSETPOS count within its months or
 * years.
 */
function matchesADay(rule: Rule, memo: Map<string, boolean>): boolean {
  if (!rule.byday && !rule.bymonthday && !rule.byyearday && !rule.byweekno) return true;
  const counts = (rule.freq === Frequency.MONTHLY || rule.freq === Frequency.YEARLY) && (rule.bysetpos || rule.byday?.some((d) => d.n));
  const options: Partial<Options> = counts
    ? calendarDays({ ...toOptions(rule), interval: 1, until: null })
    : {
        freq: Frequency.YEARLY,
        bymonth: rule.bymonth,
        bymonthday: rule.bymonthday,
        byyearday: rule.byyearday,
        byweekno: rule.byweekno,
        wkst: rule.wkst,
        byweekday: rule.byday && rule.byday.map((d) => d.weekday),
      };
  return probe(options, memo);
}

/** Whether a MONTHLY or YEARLY rule's BYSETPOS picks a time in any month or year, tried as matchesADay does. */
function setposMatches(rule: Rule, memo: Map<string, boolean>): boolean {
  return probe(calendarDays({ ...toOptions(rule), interval: 1, until: null }), memo);
}

/** Whether rrule finds an occurrence in the probe years; rules that share their options share the answer. */
function probe(options: Partial<Options>, memo: Map<string, boolean>): boolean {
  const key = JSON.stringify(options);
  if (!memo.has(key)) memo.set(key, new RRule({ ...options, dtstart: PROBE_FROM, tzid: null }, true).after(PROBE_FROM, true) !== null);
  return memo.get(key)!;
}

/**
 * Checks a policy's schedule: each rule as parseRule does, that its days occur on the
 * calendar, and that together the rules fire at most once a minute (on one second).
 * Returns the rules as stored; throws ScheduleError naming the rule.
 */
export function checkSchedule(rules: string[]): string[] {
  let second: number | null = null;
  const memo = new Map<string, boolean>();
  return rules.map((text, i) => {
    const rule = parseRule(text, i);
    if (!matchesADay(rule, memo)) {
      const parts = (["BYMONTH", "BYWEEKNO", "BYYEARDAY", "BYMONTHDAY", "BYDAY", "BYSETPOS"] as const).filter((k) => rule[k.toLowerCase() as keyof Rule] !== null);
      throw new ScheduleError(i, `never fires: no date matches ${parts.join(", ")} together`);
    }
    const own = rule.bysecond?.[0] ?? 0;
    if (second !== null && own !== second) {
      throw new ScheduleError(i, `fires at second ${own} of a minute, the rules before it at second ${second}; a schedule fires at most once a minute, so its rules share one second`);
    }
    second = own;
    return ruleBody(text).body;
  });
}

const FIXED_PERIOD_MS: Partial<Record<Frequency, number>> = {
  [Frequency.MINUTELY]: 60_000,
  [Frequency.HOURLY]: 3_600_000,
  [Frequency.DAILY]: 86_400_000,
  [Frequency.WEEKLY]: 7 * 86_400_000,
};

function floating(dt: DateTime): Date {
  return new Date(Date.UTC(dt.year, dt.month - 1, dt.day, dt.hour, dt.minute, dt.second));
}

function fromFloating(d: Date, tz: string): DateTime {
  const wall = { year: d.getUTCFullYear(), month: d.getUTCMonth() + 1, day: d.getUTCDate(), hour: d.getUTCHours(), minute: d.getUTCMinutes(), second: d.getUTCSeconds() };
  const dt = DateTime.fromObject(wall, { zone: tz });
  // A wall time that a fall-back repeats: take its first instant, as cron does.
  const shift = dt.minus({ hours: 3 }).offset - dt.offset;
  if (shift > 0) {
    const earlier = dt.minus({ minutes: shift });
    if (earlier.hour === dt.hour && earlier.minute === dt.minute && earlier.day === dt.day) return earlier;
  }
  return dt;
}

/**
 * The start of the rule's recurrence: midnight of the anchor's day, moved forward by
 * whole intervals to just before `from`, so iteration stays short however old the
 * policy is while INTERVAL keeps counting from the anchor. Steps of a day or more keep
 * two days in hand, so BYSETPOS sees whole sets.
 */
function dtstartNear(options: Partial<Options>, anchor: Date, from: Date): Date {
  const interval = options.interval ?? 1;
  const fixed = FIXED_PERIOD_MS[options.freq!];
  if (fixed) {
    const period = fixed * interval;
    const lead = fixed < 86_400_000 ? 0 : 2 * 86_400_000;
    const steps = Math.floor((from.getTime() - lead - anchor.getTime()) / period);
    return steps > 0 ? new Date(anchor.getTime() + steps * period) : anchor;
  }
  const a = DateTime.fromJSDate(anchor, { zone: "utc" });
  const f = DateTime.fromJSDate(from, { zone: "utc" }).minus({ days: 62 });
  if (options.freq === Frequency.MONTHLY) {
    const months = Math.floor(f.diff(a, "months").months / interval) * interval;
    return months > 0 ? a.plus({ months }).toJSDate() : anchor;
  }
  const years = Math.floor(f.diff(a, "years").years / interval) * interval;
  return years > 0 ? a.plus({ years }).toJSDate() : anchor;
}

/** Moves a floating time by whole years; by multiples of 400 the calendar is the same. */
function plusYears(d: Date, years: number): Date {
  if (!years) return d;
  const out = new Date(d.getTime());
  out.setUTCFullYear(out.getUTCFullYear() + years);
  return out;
}

const SEARCH_YEARS = 110;
const RRULE_LAST_YEAR = 9999;
const END_OF_TIME = new Date(Date.UTC(RRULE_LAST_YEAR + 1, 0, 1));

const DAY_MS = 86_400_000;

/**
 * Which floating days a rule below MONTHLY can fire on: its day parts as lookup tables,
 * and which days its steps (counted from the anchor's midnight) reach an allowed time.
 * Such a rule's days depend on nothing else, so the search can skip to them.
 */
interface DayFilter {
  month: boolean[];
  monthday: boolean[];
  monthdayFromEnd: boolean[];
  yearday: boolean[];
  yeardayFromEnd: boolean[];
  weekday: boolean[];
  /** Days since the anchor's, modulo its length: whether a step lands on an allowed time that day. */
  steps: boolean[];
  anchorDay: number;
  /** WEEKLY: every `weeks`-th week from the anchor's, weeks starting on `wkst`. */
  weeks: number;
  wkst: number;
}

const table = (size: number, values: number[] | null): boolean[] => {
  const out = new Array<boolean>(size).fill(values === null);
  for (const v of values ?? []) out[v] = true;
  return out;
};

/** Days since 1970-01-01 of a floating midnight. */
const dayNumber = (ms: number) => Math.floor(ms / DAY_MS);

function dayFilter(rule: Rule, options: Partial<Options>, anchor: Date): DayFilter | null {
  if (rule.freq === Frequency.MONTHLY || rule.freq === Frequency.YEARLY) return null;
  // An absent list allows every day; a list of only negative (or only positive) values allows none from the other end.
  const signed = (values: number[] | null, sign: 1 | -1, size: number) => (values === null ? table(size, null) : table(size, values.filter((v) => Math.sign(v) === sign).map(Math.abs)));
  const minutes = rule.freq === Frequency.DAILY ? 1440 : rule.freq === Frequency.WEEKLY ? 0 : options.freq === Frequency.HOURLY ? 60 : 1;
  const step = minutes * (options.interval ?? 1);
  const period = step ? step / gcd(step, 1440) : 1;
  const hours = options.byhour as number[] | null | undefined;
  const mins = options.byminute as number[] | null | undefined;
  const steps = new Array<boolean>(period).fill(false);
  for (let r = 0; r < period; r++) {
    // DAILY steps land on days, WEEKLY ones on weeks (below); their times come from BYHOUR and BYMINUTE.
    if (rule.freq === Frequency.DAILY || rule.freq === Frequency.WEEKLY) {
      steps[r] = r === 0;
      continue;
    }
    for (let t = (step - ((r * 1440) % step)) % step; t < 1440 && !steps[r]; t += step) {
      const hourOk = !hours || hours.includes(Math.floor(t / 60));
      // HOURLY steps land on hours and BYMINUTE spreads them; MINUTELY steps land on minutes.
      const minuteOk = options.freq === Frequency.HOURLY || !mins || mins.includes(t % 60);
      steps[r] = hourOk && minuteOk;
    }
  }
  return {
    month: table(13, rule.bymonth),
    monthday: signed(rule.bymonthday, 1, 32),
    monthdayFromEnd: signed(rule.bymonthday, -1, 32),
    yearday: signed(rule.byyearday, 1, 367),
    yeardayFromEnd: signed(rule.byyearday, -1, 367),
    weekday: table(7, rule.byday && rule.byday.map((d) => d.weekday)),
    steps,
    anchorDay: dayNumber(anchor.getTime()),
    weeks: rule.freq === Frequency.WEEKLY ? rule.interval : 1,
    wkst: rule.wkst ?? 0,
  };
}

/**
 * The first floating midnight at or after the day of `from` on which the rule can fire,
 * or null when none comes before `end`: month by month with table lookups, so even
 * centuries without such a day cost well under a millisecond.
 */
function nextDay(filter: DayFilter, from: Date, end: Date): Date | null {
  const mod = (a: number, n: number) => ((a % n) + n) % n;
  // 1970-01-01 was a Thursday, weekday 3 counting from Monday.
  const week = (day: number) => Math.floor((day + 3 - filter.wkst) / 7);
  const anchorWeek = week(filter.anchorDay);
  let y = from.getUTCFullYear();
  let m = from.getUTCMonth();
  let first = from.getUTCDate();
  const both = (plus: boolean[], minus: boolean[], n: number, len: number) => plus[n] || minus[len + 1 - n];
  for (let monthStart = Date.UTC(y, m, 1); monthStart < end.getTime(); monthStart = Date.UTC(y, m, 1)) {
    if (filter.month[m + 1]) {
      const monthLen = new Date(Date.UTC(y, m + 1, 0)).getUTCDate();
      const yearLen = new Date(Date.UTC(y, 1, 29)).getUTCDate() === 29 ? 366 : 365;
      const yeardayBefore = (monthStart - Date.UTC(y, 0, 1)) / DAY_MS;
      const firstDay = dayNumber(monthStart);
      for (let d = first; d <= monthLen; d++) {
        const day = firstDay + d - 1;
        if (!both(filter.monthday, filter.monthdayFromEnd, d, monthLen)) continue;
        if (!both(filter.yearday, filter.yeardayFromEnd, yeardayBefore + d, yearLen)) continue;
        if (!filter.weekday[mod(day + 3, 7)]) continue;
        if (!filter.steps[mod(day - filter.anchorDay, filter.steps.length)]) continue;
        if (filter.weeks > 1 && mod(week(day) - anchorWeek, filter.weeks) !== 0) continue;
        return day * DAY_MS < end.getTime() ? new Date(day * DAY_MS) : null;
      }
    }
    first = 1;
    if (++m === 12) {
      m = 0;
      y++;
    }
  }
  return null;
}

/**
 * A MONTHLY or YEARLY rule's options with its times replaced by the earliest ones of
 * the same count: it picks the same days (BYSETPOS counts times too, in order, but not
 * their values), each no later than the rule does. Rules that differ only in their
 * times then share their days, and those are looked for once.
 */
function calendarDays(options: Partial<Options>): Partial<Options> {
  const range = (list: unknown) => (options.bysetpos && Array.isArray(list) ? list.map((_, i) => i) : [0]);
  return { ...options, byhour: range(options.byhour), byminute: range(options.byminute), bysecond: [0] };
}

/**
 * The first occurrence strictly after `after` of any of `rules`, as a real instant,
 * or null when none occurs again. `anchor` (the policy's creation) fixes where
 * INTERVAL counts from. A rule that does not fire within the next 110 years (up to
 * 510, depending on the year) counts as never firing again.
 *
 * rrule walks every day (or hour) up to an occurrence: for a rule whose days come once
 * in decades that held the event loop for a tenth of a second per rule. So a rule below
 * MONTHLY is asked only about the days it can fire on, one day at a time, and no rule
 * is searched past the best occurrence found so far.
 */
export function nextOccurrence(rules: string[], tz: string, after: Date, anchor: Date): Date | null {
  let best: Date | null = null;
  let bestFloating: Date | null = null;
  const anchorDay = DateTime.fromJSDate(anchor, { zone: tz }).startOf("day");
  const afterFloating = floating(DateTime.fromJSDate(after, { zone: tz }));
  // Around a DST change the wall clock repeats or skips an hour, so start a little earlier
  // in floating time and skip occurrences whose real instant is not after `after`.
  const steady = DateTime.fromJSDate(new Date(after.getTime() - 3 * 3_600_000), { zone: tz }).offset === DateTime.fromJSDate(after, { zone: tz }).offset;
  const from = steady ? afterFloating : new Date(afterFloating.getTime() - 3 * 3_600_000);
  // rrule gives up on a rule that matches no date only at year 9999. Searching the same
  // calendar 400·k years later, close to that, bounds the work for any rule.
  const shift = 400 * Math.max(0, Math.floor((RRULE_LAST_YEAR - SEARCH_YEARS - from.getUTCFullYear()) / 400));
  const start = plusYears(from, shift);
  const anchorFloating = plusYears(floating(anchorDay), shift);
  // MONTHLY and YEARLY rules that differ only in their times share their days: each is looked for once.
  const calendarDayMemo = new Map<string, Date | null>();
  const probes = new Map<string, boolean>();
  const nextCalendarDay = (days: Partial<Options>, until: Date | null, lo: Date, end: Date): Date | null => {
    const midnight = new Date(dayNumber(lo.getTime()) * DAY_MS);
    const key = JSON.stringify([days, midnight, until, end]);
    if (!calendarDayMemo.has(key)) {
      const occ = new RRule({ ...days, until, dtstart: dtstartNear(days, anchorFloating, midnight), tzid: null }, true).after(midnight, true);
      calendarDayMemo.set(key, occ && occ < end ? new Date(dayNumber(occ.getTime()) * DAY_MS) : null);
    }
    return calendarDayMemo.get(key)!;
  };
  rules.forEach((text, i) => {
    const rule = parseRule(text, i);
    const options = toOptions(rule);
    const until = rule.until && plusYears(rule.until, shift);
    // Without day parts rrule takes the day (and a YEARLY rule the month) from dtstart, which
    // moves when a month is shorter; the search starts from several days, so pin them as the first would.
    if ((rule.freq === Frequency.MONTHLY || rule.freq === Frequency.YEARLY) && !rule.byweekno && !rule.byyearday && !rule.bymonthday && !rule.byday) {
      const first = dtstartNear(options, anchorFloating, start);
      options.bymonthday = [first.getUTCDate()];
      if (rule.freq === Frequency.YEARLY && !rule.bymonth) options.bymonth = [first.getUTCMonth() + 1];
    }
    const filter = dayFilter(rule, options, anchorFloating);
    const days = filter ? null : calendarDays(options);
    // A BYSETPOS no month or year ever has: rrule would walk every month to year 9999 to find that out.
    if (days && rule.bysetpos && !setposMatches(rule, probes)) return;
    let seen = 0;
    let found = false;
    /** Occurrences in (lo, hi), in order, until one is after `after`. */
    const search = (lo: Date, hi: Date) =>
      new RRule({ ...options, until, dtstart: dtstartNear(options, anchorFloating, lo), tzid: null }, true).between(lo, hi, false, (occ) => {
        const real = fromFloating(plusYears(occ, -shift), tz).toJSDate();
        if (real.getTime() > after.getTime()) {
          if (!best || real < best) {
            best = real;
            bestFloating = occ;
          }
          found = true;
          return false;
        }
        return ++seen < 2000;
      });
    // A day past the best so far cannot improve on it (a day covers any DST shift).
    const end = () => new Date(Math.min(END_OF_TIME.getTime(), until ? until.getTime() + 1000 : Infinity, bestFloating ? bestFloating.getTime() + DAY_MS : Infinity));
    for (let lo = start; !found && seen < 2000;) {
      const day = filter ? nextDay(filter, lo, end()) : nextCalendarDay(days!, until, lo, end());
      if (!day) break;
      const next = new Date(day.getTime() + DAY_MS);
      // From just before: `between` leaves out its ends, and an occurrence at `lo` counts (those not after `after` are skipped).
      search(new Date(Math.max(day.getTime(), lo.getTime()) - 1), next);
      lo = next;
    }
  });
  return best;
}

/** Every occurrence in (from, to], in order, as real instants; for previews and tests. */
export function occurrencesBetween(rules: string[], tz: string, from: Date, to: Date, anchor: Date, limit = 1000): Date[] {
  const out: Date[] = [];
  let cursor = from;
  while (out.length < limit) {
    const next = nextOccurrence(rules, tz, cursor, anchor);
    if (!next || next > to) break;
    out.push(next);
    cursor = next;
  }
  return out;
}
