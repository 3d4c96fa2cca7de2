import { DateTime, IANAZone } from "luxon";
import { Frequency, RRule, type Options } from "rrule";

/**
 * Policy schedules: iCalendar RRULEs read in an IANA time zone.
 *
 * rrule computes in "floating" time: wall-clock fields stored in a UTC Date. Each
 * occurrence is then placed in the policy's zone by luxon, which moves a time that
 * a DST change skips to the next valid instant; a repeated time gets its first
 * instant, so every wall-clock occurrence fires once.
 */

export class ScheduleError extends Error {
  constructor(readonly index: number, message: string) {
    super(message);
  }
}

export const MAX_RULES = 24;

export function isValidTimezone(tz: string): boolean {
  return typeof tz === "string" && tz.length > 0 && IANAZone.isValidZone(tz) && tz !== "" && !/^[+-]/.test(tz);
}

const ALLOWED = new Set(["FREQ", "INTERVAL", "UNTIL", "BYSECOND", "BYMINUTE", "BYHOUR", "BYDAY", "BYMONTHDAY", "BYYEARDAY", "BYWEEKNO", "BYMONTH", "BYSETPOS", "WKST"]);

/** Parses one rule; throws ScheduleError naming what is wrong. */
export function parseRule(text: string, index: number): Partial<Options> {
  const body = text.trim().replace(/^RRULE:/i, "");
  if (!body) throw new ScheduleError(index, "is empty");
  if (body.length > 500) throw new ScheduleError(index, "is longer than 500 characters");
  const keys = body.split(";").map((part) => part.split("=")[0].trim().toUpperCase());
  for (const key of keys) {
    if (key === "COUNT") throw new ScheduleError(index, "COUNT is not supported in a schedule; use UNTIL");
    if (key === "DTSTART" || key === "TZID") throw new ScheduleError(index, `${key} is not part of a rule; the policy's timezone applies`);
    if (!ALLOWED.has(key)) throw new ScheduleError(index, `unknown rule part "${key}"`);
  }
  let options: Partial<Options>;
  try {
    options = RRule.parseString(body);
  } catch (err) {
    throw new ScheduleError(index, `is not an RFC 5545 RRULE (${err instanceof Error ? err.message : "parse error"})`);
  }
  if (options.freq === undefined || options.freq === null) {
    throw new ScheduleError(index, keys.includes("FREQ") ? "FREQ must be YEARLY, MONTHLY, WEEKLY, DAILY, HOURLY or MINUTELY" : "needs FREQ");
  }
  if (options.freq === Frequency.SECONDLY) throw new ScheduleError(index, "FREQ=SECONDLY is too frequent; the finest is MINUTELY");
  if (options.interval !== undefined && (!Number.isInteger(options.interval) || options.interval < 1 || options.interval > 1000)) {
    throw new ScheduleError(index, "INTERVAL must be between 1 and 1000");
  }
  return options;
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
 * policy is while INTERVAL keeps counting from the anchor.
 */
function dtstartNear(options: Partial<Options>, anchor: Date, from: Date): Date {
  const interval = options.interval ?? 1;
  const fixed = FIXED_PERIOD_MS[options.freq!];
  const lead = 2 * 86_400_000;
  if (fixed) {
    const period = fixed * interval;
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

/**
 * The first occurrence strictly after `after` of any of `rules`, as a real instant,
 * or null when none occurs again. `anchor` (the policy's creation) fixes where
 * INTERVAL counts from.
 */
export function nextOccurrence(rules: string[], tz: string, after: Date, anchor: Date): Date | null {
  let best: Date | null = null;
  const anchorFloating = floating(DateTime.fromJSDate(anchor, { zone: tz }).startOf("day"));
  const afterFloating = floating(DateTime.fromJSDate(after, { zone: tz }));
  // Around a DST fall-back the wall clock repeats an hour, so start a little earlier in
  // floating time and skip occurrences whose real instant is not after `after`.
  const from = new Date(afterFloating.getTime() - 3 * 3_600_000);
  rules.forEach((text, i) => {
    const options = parseRule(text, i);
    const rule = new RRule({ ...options, dtstart: dtstartNear(options, anchorFloating, from), tzid: null });
    let cursor = from;
    for (let guard = 0; guard < 2000; guard++) {
      const occ = rule.after(cursor, false);
      if (!occ) return;
      const real = fromFloating(occ, tz).toJSDate();
      if (real.getTime() > after.getTime()) {
        if (!best || real < best) best = real;
        return;
      }
      cursor = occ;
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
