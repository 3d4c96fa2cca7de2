import { DateTime } from "luxon";

/** What retention needs to know of a backup. */
export interface RetentionCandidate {
  id: string;
  resourceId: string;
  createdAt: Date;
  status: string;
  trigger: "MANUAL" | "POLICY";
  /** The policy that made it (POLICY backups). */
  policyId: string | null;
  /** A FULL_SERVER image depends on it. */
  imageDepends: boolean;
}

export interface RetentionRules {
  maxBackups: number | null;
  retentionDays: number | null;
  keepDaily: number;
  keepWeekly: number;
  keepMonthly: number;
  keepYearly: number;
}

export interface RetentionDecision {
  backupId: string;
  keep: boolean;
  reasons: string[];
}

const PERIODS = [
  ["keepDaily", "daily", (d: DateTime) => d.toISODate()!],
  ["keepWeekly", "weekly", (d: DateTime) => `${d.weekYear}-W${String(d.weekNumber).padStart(2, "0")}`],
  ["keepMonthly", "monthly", (d: DateTime) => d.toFormat("yyyy-MM")],
  ["keepYearly", "yearly", (d: DateTime) => d.toFormat("yyyy")],
] as const;

export const hasRules = (r: RetentionRules) => r.maxBackups != null || r.retentionDays != null || r.keepDaily > 0 || r.keepWeekly > 0 || r.keepMonthly > 0 || r.keepYearly > 0;

/**
 * Which backups of one resource a policy keeps, and why (like Proxmox's prune
 * simulator). Protected whatever the rules: manual backups, the resource's newest
 * backup, backups in progress and backups an image depends on, and backups of
 * other policies. Among this policy's AVAILABLE backups, any rule that keeps one
 * keeps it: the newest `maxBackups`, those younger than `retentionDays`, and the
 * newest of each of the last N days, ISO weeks, months and years that have a
 * backup, in the policy's time zone. Everything else is deleted.
 */
export function decideRetention(candidates: RetentionCandidate[], policyId: string, rules: RetentionRules, timezone: string, now: Date): RetentionDecision[] {
  const sorted = [...candidates].sort((a, b) => b.createdAt.getTime() - a.createdAt.getTime() || (a.id < b.id ? 1 : -1));
  const reasons = new Map<string, string[]>(sorted.map((b) => [b.id, []]));
  const add = (id: string, reason: string) => reasons.get(id)!.push(reason);

  const newest = sorted.find((b) => b.status === "AVAILABLE") ?? sorted[0];
  const counted: RetentionCandidate[] = [];
  for (const b of sorted) {
    if (b.trigger === "MANUAL") add(b.id, "manual");
    else if (b.policyId !== policyId) add(b.id, "other policy");
    if (b === newest) add(b.id, "newest backup of the resource");
    if (b.status !== "AVAILABLE" && b.status !== "ERROR") add(b.id, `in progress (${b.status})`);
    if (b.imageDepends) add(b.id, "an image depends on it");
    if (b.trigger === "POLICY" && b.policyId === policyId && b.status === "AVAILABLE") counted.push(b);
  }
  // Failed runs hold nothing; they go with the first pass that has rules.
  if (!hasRules(rules)) {
    for (const b of sorted) if (!reasons.get(b.id)!.length) add(b.id, "no retention rule");
  }

  if (rules.maxBackups != null) counted.slice(0, rules.maxBackups).forEach((b, i) => add(b.id, `newest ${rules.maxBackups} (#${i + 1})`));
  if (rules.retentionDays != null) {
    const cutoff = now.getTime() - rules.retentionDays * 86_400_000;
    for (const b of counted) if (b.createdAt.getTime() > cutoff) add(b.id, `younger than ${rules.retentionDays} days`);
  }
  // Each backup's local time, worked out once for all the periods.
  const local = new Map<string, DateTime>();
  const localOf = (b: RetentionCandidate) => local.get(b.id) ?? local.set(b.id, DateTime.fromJSDate(b.createdAt, { zone: timezone })).get(b.id)!;
  for (const [key, label, periodOf] of PERIODS) {
    const n = rules[key];
    if (!n) continue;
    const seen = new Set<string>();
    for (const b of counted) {
      if (seen.size >= n) break;
      const period = periodOf(localOf(b));
      if (seen.has(period)) continue;
      seen.add(period);
      add(b.id, `${label} ${period}`);
    }
  }
  return sorted.map((b) => ({ backupId: b.id, keep: reasons.get(b.id)!.length > 0, reasons: reasons.get(b.id)! }));
}

/** When retentionDays will remove a policy backup. */
export function expiresAt(createdAt: Date, retentionDays: number | null): Date | null {
  return retentionDays == null ? null : new Date(createdAt.getTime() + retentionDays * 86_400_000);
}
