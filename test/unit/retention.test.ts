import { decideRetention, expiresAt, type RetentionCandidate, type RetentionRules } from "../../src/services/retention";

const P = "policy-1";
const none: RetentionRules = { maxBackups: null, retentionDays: null, keepDaily: 0, keepWeekly: 0, keepMonthly: 0, keepYearly: 0 };
let n = 0;
const b = (iso: string, extra: Partial<RetentionCandidate> = {}): RetentionCandidate => ({
  id: `b${++n}-${iso}`,
  resourceId: "r",
  createdAt: new Date(iso),
  status: "AVAILABLE",
  trigger: "POLICY",
  policyId: P,
  imageDepends: false,
  ...extra,
});
const kept = (d: ReturnType<typeof decideRetention>) => d.filter((x) => x.keep).map((x) => x.backupId.split("-").slice(1).join("-"));

it("keeps the newest maxBackups and deletes the rest", () => {
  const list = ["2026-11-01T02:00:00Z", "2026-11-02T02:00:00Z", "2026-11-03T02:00:00Z", "2026-11-04T02:00:00Z"].map((t) => b(t));
  const d = decideRetention(list, P, { ...none, maxBackups: 2 }, "UTC", new Date("2026-11-05T00:00:00Z"));
  expect(kept(d)).toEqual(["2026-11-04T02:00:00Z", "2026-11-03T02:00:00Z"]);
  expect(d[0].reasons).toEqual(["newest backup of the resource", "newest 2 (#1)"]);
  expect(d[3]).toMatchObject({ keep: false, reasons: [] });
});

it("keeps backups younger than retentionDays", () => {
  const list = [b("2026-11-01T00:00:00Z"), b("2026-11-08T00:00:00Z"), b("2026-11-09T12:00:00Z")];
  const d = decideRetention(list, P, { ...none, retentionDays: 2 }, "UTC", new Date("2026-11-10T00:00:00Z"));
  expect(kept(d)).toEqual(["2026-11-09T12:00:00Z"]);
  expect(expiresAt(new Date("2026-11-09T12:00:00Z"), 2)?.toISOString()).toBe("2026-11-11T12:00:00.000Z");
  expect(expiresAt(new Date(), null)).toBeNull();
});

it("keeps the newest of each of the last N days, ISO weeks, months and years in the policy's time zone", () => {
  // 23:30 UTC on Nov 20 is already Nov 21 in Tokyo.
  const list = [b("2026-11-20T10:00:00Z"), b("2026-11-20T23:30:00Z"), b("2026-11-21T05:00:00Z"), b("2026-11-22T05:00:00Z"), b("2026-10-15T05:00:00Z"), b("2025-12-31T05:00:00Z")];
  const now = new Date("2026-11-23T00:00:00Z");
  const daily = decideRetention(list, P, { ...none, keepDaily: 2 }, "Asia/Tokyo", now);
  expect(kept(daily)).toEqual(["2026-11-22T05:00:00Z", "2026-11-21T05:00:00Z"]);
  expect(daily.find((x) => x.backupId.endsWith("2026-11-21T05:00:00Z"))!.reasons).toEqual(["daily 2026-11-21"]);
  const utcDaily = decideRetention(list, P, { ...none, keepDaily: 3 }, "UTC", now);
  expect(kept(utcDaily)).toEqual(["2026-11-22T05:00:00Z", "2026-11-21T05:00:00Z", "2026-11-20T23:30:00Z"]);
  const weekly = decideRetention(list, P, { ...none, keepWeekly: 2 }, "UTC", now);
  // Nov 22 2026 is a Sunday: week 47 holds Nov 16-22; the week before has no backup, so week 42 (Oct 15) is next.
  expect(weekly.filter((x) => x.keep).map((x) => x.reasons)).toEqual([["newest backup of the resource", "weekly 2026-W47"], ["weekly 2026-W42"]]);
  const monthly = decideRetention(list, P, { ...none, keepMonthly: 3 }, "UTC", now);
  expect(kept(monthly)).toEqual(["2026-11-22T05:00:00Z", "2026-10-15T05:00:00Z", "2025-12-31T05:00:00Z"]);
  const yearly = decideRetention(list, P, { ...none, keepYearly: 1 }, "UTC", now);
  expect(kept(yearly)).toEqual(["2026-11-22T05:00:00Z"]);
  // 2025-12-31 is in ISO week 2026-W01.
  const isoYear = decideRetention([b("2025-12-31T05:00:00Z")], P, { ...none, keepWeekly: 1 }, "UTC", now);
  expect(isoYear[0].reasons).toContain("weekly 2026-W01");
});

it("never deletes manual backups, the newest, ones in progress, ones an image needs, or another policy's", () => {
  const list = [
    b("2026-11-01T00:00:00Z", { trigger: "MANUAL", policyId: null }),
    b("2026-11-02T00:00:00Z", { imageDepends: true }),
    b("2026-11-03T00:00:00Z", { policyId: "other" }),
    b("2026-11-04T00:00:00Z", { status: "RESTORING" }),
    b("2026-11-05T00:00:00Z"),
    b("2026-11-06T00:00:00Z", { status: "CREATING" }),
  ];
  const d = decideRetention(list, P, { ...none, maxBackups: 1 }, "UTC", new Date("2026-11-07T00:00:00Z"));
  const reasons = Object.fromEntries(d.map((x) => [x.backupId.split("-").slice(1).join("-"), x.reasons]));
  expect(reasons["2026-11-01T00:00:00Z"]).toEqual(["manual"]);
  expect(reasons["2026-11-02T00:00:00Z"]).toEqual(["an image depends on it"]);
  expect(reasons["2026-11-03T00:00:00Z"]).toEqual(["other policy"]);
  expect(reasons["2026-11-04T00:00:00Z"]).toEqual(["in progress (RESTORING)"]);
  expect(reasons["2026-11-05T00:00:00Z"]).toEqual(["newest backup of the resource", "newest 1 (#1)"]);
  expect(reasons["2026-11-06T00:00:00Z"]).toEqual(["in progress (CREATING)"]);
  expect(d.every((x) => x.keep)).toBe(true);
});

it("keeps everything when the policy has no retention rule, and deletes failed runs when it has one", () => {
  const list = [b("2026-11-01T00:00:00Z", { status: "ERROR" }), b("2026-11-02T00:00:00Z")];
  expect(decideRetention(list, P, none, "UTC", new Date()).every((x) => x.keep)).toBe(true);
  const d = decideRetention(list, P, { ...none, retentionDays: 30 }, "UTC", new Date("2026-11-03T00:00:00Z"));
  expect(d.map((x) => x.keep)).toEqual([true, false]);
});
