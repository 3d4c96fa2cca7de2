/**
 * Random schedules, good and bad, thrown at the RRULE reader and at createPolicy over
 * the API. Every answer must be a rule (a policy) or a ScheduleError (BAD_USER_INPUT),
 * never anything else, and never slow. The seed is fixed; STOWAGE_FUZZ_SEED=N runs
 * another one, and a failure names the seed that found it.
 */
import { storableText } from "../../src/services/validate";
import { runScheduleJobs, type ScheduleJob, type ScheduleResult } from "../helpers/schedule-worker";
import { startTestService, type TestService } from "../helpers/service";

const SEED = Number(process.env.STOWAGE_FUZZ_SEED ?? 20261206) >>> 0;
const DIRECT = 20_000;
const FULL_EVERY = 20;
const API = 300;
/** The longest a single rule may take to check and compute, in the worker and over the API. */
const RULE_MS = 10_000;

jest.setTimeout(240_000);

function failWith(message: string): never {
  throw new Error(`${message}\n(seed ${SEED}: run again with STOWAGE_FUZZ_SEED=${SEED})`);
}

/** xorshift32: small, fast and the same everywhere. */
function random(seed: number) {
  let x = seed || 0x9e3779b9;
  const next = () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
  const int = (n: number) => Math.floor(next() * n);
  return { next, int, chance: (p: number) => next() < p, pick: <T>(xs: readonly T[]): T => xs[int(xs.length)] };
}

const rnd = random(SEED);

const RANGES: Record<string, [number, number, boolean]> = {
  BYSECOND: [0, 59, false],
  BYMINUTE: [0, 59, false],
  BYHOUR: [0, 23, false],
  BYMONTHDAY: [1, 31, true],
  BYYEARDAY: [1, 366, true],
  BYWEEKNO: [1, 53, true],
  BYMONTH: [1, 12, false],
  BYSETPOS: [1, 366, true],
};
const WEEKDAYS = ["MO", "TU", "WE", "TH", "FR", "SA", "SU"];
const FREQS = ["MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"];
const ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu"];
/** Characters that have no place in a rule: controls, NUL, DEL, spaces of all kinds, lone surrogates, others. */
const JUNK = [
  "\u0000",
  "\u0001",
  "\t",
  "\n",
  "\r",
  "\u001b",
  "\u007f",
  " ",
  "\u00a0",
  "\ufeff",
  "\u2028",
  "\ud800",
  "\udfff",
  "\ud83d",
  "😀",
  "é",
  "ß",
  "٣",
  "１",
  ":",
  "\\",
  '"',
  "'",
  "_",
  ".",
  "*",
  "%",
  "#",
  "/",
  "<",
  "=",
  ";",
  ",",
  "+",
  "-",
];

function junkChar(): string {
  return rnd.chance(0.7) ? rnd.pick(JUNK) : String.fromCharCode(rnd.int(0x10000));
}

function number(min: number, max: number): string {
  switch (rnd.int(10)) {
    case 0:
      return String(rnd.pick([min - 1, max + 1, -max, -min, 60, 99, 367, 1001]));
    case 1:
      return rnd.pick(["-0", "+0", "0", "00", "000", `+${min + rnd.int(max - min + 1)}`, `0${min + rnd.int(max - min + 1)}`]);
    case 2:
      return rnd.pick(["9".repeat(3 + rnd.int(30)), "", "1.5", "1e1", "0x1f", "--1", "++1", "+-1", "1-", "NaN", "Infinity", " 1", "١", "２"]);
    default:
      return String(min + rnd.int(max - min + 1));
  }
}

/** A value in range: as a user means it, though not always a rule that can fire. */
function goodNumber(min: number, max: number, signed: boolean): string {
  const n = rnd.chance(0.3) ? rnd.pick([min, max]) : min + rnd.int(max - min + 1);
  return signed && rnd.chance(0.3) ? `-${n}` : String(n);
}

function list(item: () => string): string {
  const n = rnd.chance(0.03) ? 55 + rnd.int(20) : rnd.chance(0.6) ? 1 : 2 + rnd.int(rnd.chance(0.2) ? 60 : 6);
  let out = Array.from({ length: n }, item).join(",");
  if (rnd.chance(0.04)) out = out.replace(",", ",,");
  if (rnd.chance(0.03)) out += ",";
  return out;
}

function weekday(good: boolean): string {
  const day = good || rnd.chance(0.9) ? rnd.pick(WEEKDAYS) : rnd.pick(["XX", "MON", "M", "", "SO"]);
  const shown = rnd.chance(0.2) ? day.toLowerCase() : day;
  if (rnd.chance(0.7)) return shown;
  if (good) return `${rnd.pick(["", "+", "-"])}${1 + rnd.int(rnd.chance(0.5) ? 5 : 53)}${shown}`;
  return `${rnd.pick(["", "+", "-", "--"])}${rnd.pick(["0", "1", "2", "5", "6", "53", "54", "99", "007"])}${shown}`;
}

function until(good: boolean): string {
  const pad = (n: number, w = 2) => String(n).padStart(w, "0");
  if (good) return `${2026 + rnd.int(80)}${pad(1 + rnd.int(12))}${pad(1 + rnd.int(28))}${rnd.pick(["", `T${pad(rnd.int(24))}${pad(rnd.int(60))}00`, `T${pad(rnd.int(24))}0000Z`])}`;
  const y = rnd.pick([1969, 1970, 2025, 2026, 2027, 2100, 9999, 0, 99999]);
  const date = `${pad(y, 4)}${pad(rnd.chance(0.9) ? 1 + rnd.int(12) : rnd.pick([0, 13]))}${pad(rnd.chance(0.9) ? 1 + rnd.int(28) : rnd.pick([0, 29, 30, 31, 32]))}`;
  const time = `T${pad(rnd.int(25))}${pad(rnd.int(61))}${pad(rnd.int(61))}`;
  return rnd.pick([date, date + time, `${date}${time}Z`, `${date}${time}z`, date.slice(0, 7), `${date}T`, `${date}${time}ZZ`]);
}

const GOOD_KEYS = ["INTERVAL", "UNTIL", "BYDAY", "BYDAY", "BYDAY", "WKST", ...Object.keys(RANGES), "BYHOUR", "BYMINUTE", "BYMONTH", "BYMONTHDAY"];

function part(good: boolean): string {
  const key = good || rnd.chance(0.85) ? rnd.pick(GOOD_KEYS) : rnd.pick(["COUNT", "DTSTART", "TZID", "BYEASTER", "X-NAME", "FREQ", ""]);
  const shown = rnd.chance(0.1) ? key.toLowerCase() : key;
  if (!good && rnd.chance(0.02)) return shown;
  let value: string;
  if (key in RANGES) {
    const [min, max, signed] = RANGES[key];
    value = list(() => (good ? goodNumber(min, max, signed) : number(min, max)));
  } else if (key === "BYDAY") value = list(() => weekday(good));
  else if (key === "INTERVAL") value = good ? String(1 + rnd.int(rnd.pick([2, 7, 15, 24, 45, 60, 120, 1000]))) : number(1, 1000);
  else if (key === "UNTIL") value = until(good);
  else if (key === "WKST") value = good ? rnd.pick(WEEKDAYS) : rnd.pick([...WEEKDAYS, "XX", ""]);
  else if (key === "FREQ") value = rnd.pick([...FREQS, "SECONDLY"]);
  else value = number(0, 10);
  return `${shown}=${value}`;
}

/**
 * A rule: FREQ and a few parts. Some have only values in range (many of those still
 * refused: parts that do not go together, steps that never fire, days that never
 * come), some carry bad values, some are mangled with stray characters, some junk.
 */
function rule(): string {
  const kind = rnd.next();
  if (kind < 0.03) return Array.from({ length: rnd.int(40) }, junkChar).join("");
  if (kind < 0.04) return `FREQ=DAILY;BYHOUR=${"1,".repeat(200 + rnd.int(2000))}1`;
  const good = kind > 0.5;
  const parts: string[] = [];
  if (good || rnd.chance(0.93)) parts.push(`FREQ=${good || rnd.chance(0.95) ? rnd.pick(FREQS) : rnd.pick(["SECONDLY", "daily", "Weekly", "NEVER", "", "DAILY=2"])}`);
  const keys = new Set<string>();
  for (let n = 1 + rnd.int(good ? 5 : 6); n > 0; n--) {
    const p = part(good);
    const key = p.split("=")[0].toUpperCase();
    if (good && keys.has(key)) continue;
    keys.add(key);
    parts.push(p);
  }
  if (rnd.chance(0.3)) parts.sort(() => rnd.next() - 0.5);
  let text = parts.join(!good && rnd.chance(0.04) ? ";;" : ";");
  if (good) return rnd.chance(0.05) ? `RRULE:${text}` : text;
  if (rnd.chance(0.03)) text += ";";
  if (rnd.chance(0.03)) text = ";" + text;
  if (rnd.chance(0.08)) text = rnd.pick(["RRULE:", "rrule:", "RRULE:RRULE:"]) + text;
  if (rnd.chance(0.08)) text = rnd.pick([" ", "\t", "\n", "\r\n", "  "]) + text + rnd.pick(["", " ", "\n"]);
  if (kind < 0.15) {
    const at = rnd.int(text.length + 1);
    text = text.slice(0, at) + junkChar() + text.slice(at + (rnd.chance(0.5) ? 1 : 0));
  }
  return text;
}

/** A second, plain reading of a rule parseRule accepted: every part known once, every number in its range. */
function checkAccepted(text: string, parsed: Record<string, unknown>): string | null {
  const body = text.replace(/^[ \t\r\n]+|[ \t\r\n]+$/g, "").replace(/^RRULE:/i, "");
  if (!/^[A-Za-z0-9=;,+-]+$/.test(body)) return "has characters outside the RRULE alphabet";
  const seen = new Set<string>();
  for (const p of body.split(";")) {
    const [key, value, extra] = p.split("=");
    const k = key.toUpperCase();
    if (extra !== undefined || !value) return `part ${p} is not KEY=VALUE`;
    if (seen.has(k)) return `${k} twice`;
    seen.add(k);
    if (k in RANGES) {
      const [min, max, signed] = RANGES[k];
      const items = value.split(",");
      if (items.length > 60) return `${k} has ${items.length} values`;
      const numbers = items.map(Number);
      for (const item of items) {
        const n = Math.abs(Number(item));
        if (!(signed ? /^[+-]?\d{1,3}$/ : /^\d{1,3}$/).test(item) || n < min || n > max) return `${k}=${item} is out of range`;
      }
      if (new Set(numbers).size !== numbers.length) return `${k} repeats a value`;
      if (JSON.stringify(parsed[k.toLowerCase()]) !== JSON.stringify(numbers)) return `${k} read as ${JSON.stringify(parsed[k.toLowerCase()])}`;
    } else if (k === "BYDAY") {
      for (const item of value.split(",")) {
        const m = /^([+-]?)(\d{0,2})(MO|TU|WE|TH|FR|SA|SU)$/i.exec(item);
        if (!m || (m[1] && !m[2]) || (m[2] && (Number(m[2]) < 1 || Number(m[2]) > 53))) return `BYDAY=${item} is not a weekday`;
      }
    } else if (k === "FREQ") {
      if (!FREQS.includes(value.toUpperCase())) return `FREQ=${value}`;
    } else if (k === "INTERVAL") {
      if (!/^\d{1,4}$/.test(value) || Number(value) < 1 || Number(value) > 1000) return `INTERVAL=${value}`;
    } else if (k === "UNTIL") {
      if (!/^\d{8}(T\d{6}Z?)?$/i.test(value)) return `UNTIL=${value}`;
    } else if (k === "WKST") {
      if (!WEEKDAYS.includes(value.toUpperCase())) return `WKST=${value}`;
    } else return `unknown part ${k}`;
  }
  if (!seen.has("FREQ")) return "no FREQ";
  if (String(parsed.bysecond ?? "0").includes(",")) return "more than one BYSECOND";
  return null;
}

function assertAnswer(job: ScheduleJob, result: ScheduleResult): void {
  if ("crash" in result) failWith(`${JSON.stringify(job.schedule)} threw something other than a ScheduleError: ${result.crash}`);
  if (result.ms > RULE_MS) failWith(`${JSON.stringify(job.schedule)} took ${Math.round(result.ms)} ms`);
  if (result.ok && job.mode === "parse") {
    const wrong = checkAccepted(job.schedule[0], result.rule as Record<string, unknown>);
    if (wrong) failWith(`${JSON.stringify(job.schedule[0])} was accepted, yet ${wrong}`);
  }
  if (!result.ok && (result.index < 0 || result.index >= job.schedule.length || !result.message)) failWith(`${JSON.stringify(job.schedule)}: a ScheduleError without a rule or a message`);
}

it("reads 20,000 random rules: a rule in range or a ScheduleError, never anything else, never slow", async () => {
  const at = new Date().toISOString();
  const jobs: ScheduleJob[] = Array.from({ length: DIRECT }, (_, i) => ({ schedule: [rule()], mode: i % FULL_EVERY ? "parse" : "full", tz: rnd.pick(ZONES), at }));
  const started = Date.now();
  const results = await runScheduleJobs(jobs, RULE_MS).catch((err: Error) => failWith(err.message));
  results.forEach((r, i) => assertAnswer(jobs[i], r));
  // The generator reaches both sides, and the checks past the syntax.
  const accepted = results.filter((r) => "ok" in r && r.ok).length;
  expect(accepted).toBeGreaterThan(DIRECT / 10);
  expect(DIRECT - accepted).toBeGreaterThan(DIRECT / 4);
  const messages = results.map((r) => ("message" in r ? r.message : ""));
  for (const m of [/is out of range/, /never fires/, /fires more than once a minute/, /has the (control character|lone surrogate|character) U\+/, /appears twice/, /is not an integer/]) {
    if (!messages.some((x) => m.test(x))) failWith(`no rule was refused with ${m}`);
  }
  expect(Date.now() - started).toBeLessThan(120_000);
});

/** The refusal of the first rule holding NUL or an unpaired surrogate, as every text argument gets it. */
function unstorableRule(schedule: string[]): { field: string; message: string } | null {
  for (const [i, rule] of schedule.entries()) {
    try {
      storableText(rule, `schedule[${i}]`);
    } catch (err) {
      return { field: `schedule[${i}]`, message: (err as Error).message };
    }
  }
  return null;
}

describe("over the API", () => {
  let svc: TestService;
  beforeAll(async () => {
    svc = await startTestService({ MUTATIONS_PER_MINUTE: "0" }); // 300 createPolicy calls in a row: the fuzz, not the rate limit, is under test
  });
  afterAll(async () => {
    await svc?.stop();
  });

  it("answers 300 random schedules to createPolicy with a policy or BAD_USER_INPUT, never INTERNAL, never a 500", async () => {
    const at = new Date().toISOString();
    const inputs = Array.from({ length: API }, (_, i) => ({
      name: `fuzz-${i}`,
      schedule: Array.from({ length: rnd.chance(0.8) ? 1 : 2 + rnd.int(2) }, rule),
      timezone: rnd.pick(ZONES),
    }));
    // The same checks first, in a worker under a watchdog: a rule that would hang the service fails here instead.
    const jobs: ScheduleJob[] = inputs.map((input) => ({ schedule: input.schedule, mode: "full", tz: input.timezone, at }));
    const vetted = await runScheduleJobs(jobs, RULE_MS).catch((err: Error) => failWith(err.message));
    vetted.forEach((r, i) => assertAnswer(jobs[i], r));

    const CREATE = `mutation ($i: CreatePolicyInput!) { createPolicy(input: $i) { policy { id schedule nextRunAt } } }`;
    let created = 0;
    const started = Date.now();
    for (const [i, input] of inputs.entries()) {
      const t = Date.now();
      const r = await svc.gql(CREATE, { i: input });
      const what = `createPolicy(${JSON.stringify(input.schedule)}, ${input.timezone}) answered ${r.status} ${JSON.stringify(r.errors ?? r.data)}`;
      if (Date.now() - t > RULE_MS) failWith(`${what} after ${Date.now() - t} ms`);
      if (r.status >= 500) failWith(what);
      const check = vetted[i] as ScheduleResult & { ok: boolean };
      if (r.errors) {
        const { code, field } = r.errors[0].extensions ?? {};
        if (r.errors.length !== 1 || code !== "BAD_USER_INPUT") failWith(what);
        const unstorable = unstorableRule(input.schedule);
        if (unstorable) {
          // Text Postgres cannot store is refused for every argument alike, before the rules are read.
          if (field !== unstorable.field || r.errors[0].message !== unstorable.message) failWith(`${what}; expected ${JSON.stringify(unstorable)}`);
        } else if (check.ok) {
          // Checked, then found never to occur again: the service says so of the whole schedule.
          if (field !== "schedule" || !/never occurs again/.test(r.errors[0].message)) failWith(what);
        } else {
          const refused = check as { index: number; message: string };
          if (field !== `schedule[${refused.index}]` || r.errors[0].message !== `schedule[${refused.index}]: ${refused.message}`) failWith(`${what}; the reader said ${JSON.stringify(check)}`);
        }
      } else {
        const policy = r.data.createPolicy.policy;
        if (!check.ok || JSON.stringify(policy.schedule) !== JSON.stringify((check as { stored: string[] }).stored)) failWith(`${what}; the reader said ${JSON.stringify(check)}`);
        if (!policy.nextRunAt || Date.parse(policy.nextRunAt) < Date.parse(at)) failWith(`${what}: no next run ahead`);
        created++;
      }
    }
    expect(created).toBeGreaterThan(API / 20);
    expect(Date.now() - started).toBeLessThan(120_000);
  });
});
