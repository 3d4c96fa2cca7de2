import { types } from "pg";
import { parseTimestamptz } from "../../src/db/timestamps";

// pg's own parser, before anything replaced it: the reference.
const reference = types.getTypeParser(1184, "text") as (text: string) => Date | number | null;

const same = (text: string) => {
  const want = reference(text);
  const got = parseTimestamptz(text);
  expect([text, got instanceof Date ? got.getTime() : got]).toEqual([text, want instanceof Date ? want.getTime() : want]);
};

describe("parseTimestamptz", () => {
  it("reads what Postgres writes as pg does, to the millisecond", () => {
    for (const text of [
      "2026-12-07 02:31:35+00",
      "2026-12-07 02:31:35.1+00",
      "2026-12-07 02:31:35.123456+00",
      "2026-12-07 02:31:35.999999+00",
      "2026-12-07 02:31:35.000001-00",
      "2024-02-29 23:59:59.5+05:30",
      "1970-01-01 00:00:00-08",
      "1969-12-31 23:59:59.999+00",
      "2000-01-01 00:00:00+14",
      "1883-11-18 12:03:58+00:03:58",
      "9999-12-31 23:59:59.999999+00",
    ]) {
      same(text);
    }
  });

  it("hands every other form to pg's parser", () => {
    for (const text of ["infinity", "-infinity", "0099-01-01 00:00:00+00", "0001-01-01 00:00:00+00 BC", "12345-01-01 00:00:00+00", "2026-12-07 02:31:35", "2026-12-07T02:31:35Z"]) {
      same(text);
    }
  });

  it("agrees with pg on random instants and offsets", () => {
    let seed = 42;
    const rand = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const pad = (v: number, n = 2) => String(v).padStart(n, "0");
    for (let i = 0; i < 5000; i++) {
      const d = new Date(Date.UTC(1000 + Math.floor(rand() * 9000), 0, 1) + Math.floor(rand() * 365 * 86400_000));
      const frac =
        rand() < 0.2
          ? ""
          : "." +
            String(Math.floor(rand() * 1e6))
              .padStart(6, "0")
              .slice(0, 1 + Math.floor(rand() * 6));
      const offMin = Math.floor(rand() * 27 * 60) - 12 * 60;
      const off = `${offMin < 0 ? "-" : "+"}${pad(Math.floor(Math.abs(offMin) / 60))}${offMin % 60 ? ":" + pad(Math.abs(offMin) % 60) : ""}`;
      const text = `${pad(d.getUTCFullYear(), 4)}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}${frac}${off}`;
      same(text);
    }
  });
});
