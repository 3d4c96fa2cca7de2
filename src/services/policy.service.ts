import { In, type EntityManager } from "typeorm";
import { rows } from "../db/sql";
import { Backup, Disk, JobType, Policy, PolicyBinding, PolicyRun, Server, type Job, type SkippedResource } from "../entities";
import type { BackupService, PolicyTarget } from "./backup.service";
import type { JobQueue } from "./job-queue";
import { decideRetention, hasRules, type RetentionCandidate, type RetentionDecision } from "./retention";
import { isValidTimezone, MAX_RULES, ScheduleError } from "../domain/schedule";
import { scheduleThread } from "../domain/schedule-thread";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badInput, conflict, notFound } from "../domain/errors";
import { decodeId, fromGlobalId, toGlobalId } from "./global-id";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs, type ListSelection } from "./pagination";
import { intInRange, resourceName } from "./validate";

export interface RetentionInput {
  maxBackups?: number | null;
  retentionDays?: number | null;
  keepDaily?: number | null;
  keepWeekly?: number | null;
  keepMonthly?: number | null;
  keepYearly?: number | null;
}

export interface CreatePolicyInput {
  name: string;
  enabled?: boolean | null;
  schedule: string[];
  timezone?: string | null;
  retention?: RetentionInput | null;
}

export interface UpdatePolicyInput extends Partial<Omit<CreatePolicyInput, "name">> {
  id: string;
  name?: string | null;
}

export interface PolicyFilter {
  enabled?: boolean | null;
  name?: string | null;
}

export function policyConditions(filter: PolicyFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.enabled != null) out.push({ sql: "t.enabled = $1", params: [filter.enabled] });
  if (filter.name) out.push({ sql: "t.name ILIKE $1", params: [likeSubstring(filter.name)] });
  return out;
}

/** The field a ScheduleError names: the rule, or the whole schedule when no one rule is to blame. */
const ruleField = (field: string, err: ScheduleError) => (err.index >= 0 ? `${field}[${err.index}]` : field);

async function validateSchedule(rules: string[], field = "schedule"): Promise<string[]> {
  if (!Array.isArray(rules) || rules.length === 0) throw badInput(field, "needs at least one RRULE");
  if (rules.length > MAX_RULES) throw badInput(field, `at most ${MAX_RULES} rules`);
  try {
    return await scheduleThread.check(rules);
  } catch (err) {
    if (err instanceof ScheduleError) throw badInput(ruleField(field, err), err.message);
    throw err;
  }
}

function validateTimezone(tz: string, field = "timezone"): string {
  if (!isValidTimezone(tz)) throw badInput(field, `"${tz}" is not an IANA time zone (e.g. Europe/Berlin, UTC)`);
  return tz;
}

const RETENTION_LIMITS = {
  maxBackups: [1, 99999],
  retentionDays: [1, 99999],
  keepDaily: [0, 100],
  keepWeekly: [0, 100],
  keepMonthly: [0, 100],
  keepYearly: [0, 100],
} as const;

interface Retention {
  maxBackups: number | null;
  retentionDays: number | null;
  keepDaily: number;
  keepWeekly: number;
  keepMonthly: number;
  keepYearly: number;
}

function validateRetention(input: RetentionInput): Retention {
  const out = {} as Record<keyof RetentionInput, number | null>;
  for (const [key, [min, max]] of Object.entries(RETENTION_LIMITS) as [keyof RetentionInput, readonly [number, number]][]) {
    const value = input[key];
    out[key] = value == null ? (min === 0 ? 0 : null) : intInRange(value, `retention.${key}`, min, max);
  }
  return out as unknown as Retention;
}

export class PolicyService {
  list(ctx: RequestContext, list: ListName & `${string}olicies`, key: string, args: PageArgs & { filter?: PolicyFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection(list, key, args, policyConditions(args.filter), select);
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Policy> {
    const policy = await ctx.loaders.policy.load(decodeId(globalId, "Policy", field));
    if (!policy) throw notFound("policy", globalId);
    return policy;
  }

  async create(ctx: RequestContext, input: CreatePolicyInput): Promise<Policy> {
    const repo = ctx.ds.getRepository(Policy);
    const now = ctx.now();
    const policy = repo.create({
      projectId: ctx.projectId,
      name: resourceName(input.name, "name"),
      enabled: input.enabled ?? true,
      schedule: await validateSchedule(input.schedule),
      timezone: validateTimezone(input.timezone ?? "UTC"),
      ...validateRetention(input.retention ?? {}),
      lastRunAt: null,
      createdAt: now,
    });
    policy.nextRunAt = await this.nextRun(policy, now);
    const saved = await repo.save(policy);
    ctx.invalidate();
    return saved;
  }

  async update(ctx: RequestContext, input: UpdatePolicyInput): Promise<Policy> {
    const id = decodeId(input.id, "Policy", "id");
    const saved = await ctx.ds.transaction(async (em) => {
      const policy = await em.findOne(Policy, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!policy) throw notFound("policy", input.id);
      if (input.name != null) policy.name = resourceName(input.name, "name");
      if (input.enabled != null) policy.enabled = input.enabled;
      if (input.schedule != null) policy.schedule = await validateSchedule(input.schedule);
      if (input.timezone != null) policy.timezone = validateTimezone(input.timezone);
      if (input.retention) {
        // Only the retention fields given change; null clears a count rule.
        const merged: RetentionInput = {};
        for (const key of Object.keys(RETENTION_LIMITS) as (keyof RetentionInput)[]) {
          merged[key] = key in input.retention ? input.retention[key] : policy[key];
        }
        Object.assign(policy, validateRetention(merged));
      }
      const now = ctx.now();
      policy.nextRunAt = await this.nextRun(policy, now);
      return em.save(policy);
    });
    ctx.invalidate();
    return saved;
  }

  /** Deletes the policy; its resources are unbound and their backups stay. */
  async delete(ctx: RequestContext, globalId: string): Promise<Policy> {
    const id = decodeId(globalId, "Policy", "id");
    const policy = await ctx.ds.transaction(async (em) => {
      const p = await em.findOne(Policy, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!p) throw notFound("policy", globalId);
      await em.delete(Policy, { id, projectId: ctx.projectId });
      return p;
    });
    ctx.invalidate();
    return policy;
  }

  /** Binds servers and disks; binding one that another policy holds is a conflict. */
  async bind(ctx: RequestContext, input: { policyId: string; resourceIds: string[] }): Promise<Policy> {
    const policyId = decodeId(input.policyId, "Policy", "policyId");
    const { servers, disks } = this.splitResources(input.resourceIds);
    const policy = await ctx.ds
      .transaction(async (em) => {
        const p = await em.findOne(Policy, { where: { id: policyId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        if (!p) throw notFound("policy", input.policyId);
        await this.requireResources(em, ctx, servers, disks);
        const existing = await em.find(PolicyBinding, {
          where: [...(servers.length ? [{ serverId: In(servers), projectId: ctx.projectId }] : []), ...(disks.length ? [{ diskId: In(disks), projectId: ctx.projectId }] : [])],
        });
        const taken = existing.find((b) => b.policyId !== policyId);
        if (taken) {
          const what = taken.serverId ? `server ${toGlobalId("Server", taken.serverId)}` : `disk ${toGlobalId("Disk", taken.diskId!)}`;
          throw conflict(`${what} is already bound to policy ${toGlobalId("Policy", taken.policyId)}; unbind it first`);
        }
        const already = new Set(existing.map((b) => b.serverId ?? b.diskId));
        const rows = [
          ...servers.filter((id) => !already.has(id)).map((id) => ({ serverId: id, diskId: null })),
          ...disks.filter((id) => !already.has(id)).map((id) => ({ serverId: null, diskId: id })),
        ].map((r) => em.create(PolicyBinding, { ...r, projectId: ctx.projectId, policyId }));
        if (rows.length) await em.save(rows);
        return p;
      })
      .catch((err) => {
        throw translateDbError(err, {
          uq_policy_bindings_server: "a server is bound to at most one policy",
          uq_policy_bindings_disk: "a disk is bound to at most one policy",
        });
      });
    ctx.invalidate();
    return policy;
  }

  async unbind(ctx: RequestContext, input: { policyId: string; resourceIds: string[] }): Promise<Policy> {
    const policyId = decodeId(input.policyId, "Policy", "policyId");
    const { servers, disks } = this.splitResources(input.resourceIds);
    const policy = await ctx.ds.transaction(async (em) => {
      const p = await em.findOne(Policy, { where: { id: policyId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!p) throw notFound("policy", input.policyId);
      // A resource that exists but is not bound to this policy is left as it is; one that does not exist is an error, as for bindPolicy.
      await this.requireResources(em, ctx, servers, disks);
      if (servers.length) await em.delete(PolicyBinding, { policyId, serverId: In(servers) });
      if (disks.length) await em.delete(PolicyBinding, { policyId, diskId: In(disks) });
      return p;
    });
    ctx.invalidate();
    return policy;
  }

  /** The next time the schedule fires, or null when disabled; a schedule that never occurs again is refused, enabled or not. */
  private async nextRun(policy: Policy, now: Date): Promise<Date | null> {
    let next: Date | null;
    try {
      next = await scheduleThread.next(policy.schedule, policy.timezone, now, policy.createdAt);
    } catch (err) {
      // A schedule stored before its rules were checked as they are now.
      if (err instanceof ScheduleError) throw badInput(ruleField("schedule", err), `${err.message}; update the schedule`);
      throw err;
    }
    if (!next) throw badInput("schedule", "never occurs again (check UNTIL and the BY… parts)");
    return policy.enabled ? next : null;
  }

  /** Servers and disks of the caller's project; the first one missing (or another project's) is NOT_FOUND, named by its global ID. */
  private async requireResources(em: EntityManager, ctx: RequestContext, servers: string[], disks: string[]): Promise<void> {
    const foundServers = servers.length ? await em.findBy(Server, { id: In(servers), projectId: ctx.projectId }) : [];
    const foundDisks = disks.length ? await em.findBy(Disk, { id: In(disks), projectId: ctx.projectId }) : [];
    const missing = [
      ...servers.filter((id) => !foundServers.some((s) => s.id === id)).map((id) => toGlobalId("Server", id)),
      ...disks.filter((id) => !foundDisks.some((d) => d.id === id)).map((id) => toGlobalId("Disk", id)),
    ];
    if (missing.length) throw notFound("resource", missing[0]);
  }

  private splitResources(resourceIds: string[]): { servers: string[]; disks: string[] } {
    if (!Array.isArray(resourceIds) || resourceIds.length === 0) throw badInput("resourceIds", "needs at least one server or disk ID");
    if (resourceIds.length > 1000) throw badInput("resourceIds", "at most 1000 IDs at once");
    const servers = new Set<string>();
    const disks = new Set<string>();
    resourceIds.forEach((gid, i) => {
      const parsed = fromGlobalId(gid);
      if (parsed?.type === "Server") servers.add(parsed.id);
      else if (parsed?.type === "Disk") disks.add(parsed.id);
      else throw badInput(`resourceIds[${i}]`, "not a Server or Disk ID");
    });
    return { servers: [...servers], disks: [...disks] };
  }
}

/** A backup of a bound resource as retention sees it. */
interface CandidateRow {
  id: string;
  resource_id: string;
  created_at: Date;
  status: string;
  trigger: "MANUAL" | "POLICY";
  policy_id: string | null;
  image_depends: boolean;
}

/**
 * Running policies: backing up every bound resource (skipping, with the reason,
 * those that are busy) and applying retention. The scheduler calls `runIn` inside
 * the transaction that claims the occurrence, so a run happens exactly once.
 */
export class PolicyRunner {
  constructor(
    private readonly backups: BackupService,
    private readonly queue: JobQueue,
  ) {}

  /** What backups capture disks through (see CaptureGate). */
  get capture() {
    return this.backups.capture;
  }

  async runIn(em: EntityManager, ctx: RequestContext, policy: Policy, trigger: "SCHEDULE" | "MANUAL", scheduledFor: Date): Promise<{ run: PolicyRun; jobs: Job[] }> {
    const targets = await rows<PolicyTarget>(
      em,
      `SELECT s.id, 'SERVER' AS type, s.name FROM policy_bindings b JOIN servers s ON s.id = b.server_id WHERE b.policy_id = $1
       UNION ALL
       SELECT d.id, 'DISK' AS type, d.name FROM policy_bindings b JOIN disks d ON d.id = b.disk_id WHERE b.policy_id = $1
       ORDER BY 2, 3, 1`,
      [policy.id],
    );
    const { jobs, skipped: refused } = await this.backups.createForPolicy(em, ctx, policy.id, targets);
    const skipped: SkippedResource[] = refused.map(({ target: t, reason }) => ({
      resourceType: t.type,
      resourceId: toGlobalId(t.type === "SERVER" ? "Server" : "Disk", t.id),
      resourceName: t.name,
      reason,
    }));
    const run = await em.save(
      em.create(PolicyRun, { projectId: policy.projectId, policyId: policy.id, trigger, scheduledFor, startedAt: ctx.now(), backupCount: jobs.length, deletedCount: 0, skipped }),
    );
    return { run, jobs };
  }

  /** Runs a policy now (runPolicy): its backups, then retention. */
  async runNow(ctx: RequestContext, globalId: string): Promise<PolicyRun> {
    const id = decodeId(globalId, "Policy", "id");
    const { run, jobs, policy } = await this.backups.capture.hold(() =>
      ctx.ds.transaction(async (em) => {
        const p = await em.findOne(Policy, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
        if (!p) throw notFound("policy", globalId);
        // Asked for now, it is refused as a whole; a scheduled run records each resource as skipped instead.
        await this.queue.checkSpaceFor(JobType.BACKUP);
        const r = await this.runIn(em, ctx, p, "MANUAL", ctx.now());
        p.lastRunAt = ctx.now();
        await em.save(p);
        return { ...r, policy: p };
      }),
    );
    await this.queue.announce(...jobs);
    run.deletedCount = await this.retain(ctx, policy, run);
    ctx.invalidate();
    return run;
  }

  private async candidates(ctx: RequestContext, policy: Policy): Promise<CandidateRow[]> {
    return rows<CandidateRow>(
      ctx.ds,
      `SELECT b.id, b.resource_id, b.created_at, b.status, b.trigger, b.policy_id,
              EXISTS (SELECT 1 FROM images i WHERE i.source_backup_id = b.id AND i.type = 'FULL_SERVER' AND i.status <> 'KILLED') AS image_depends
         FROM backups b
        WHERE b.parent_id IS NULL AND b.project_id = $2
          AND b.resource_id IN (SELECT coalesce(server_id, disk_id) FROM policy_bindings WHERE policy_id = $1)
        ORDER BY b.resource_id, b.created_at DESC`,
      [policy.id, policy.projectId],
    );
  }

  /** What the next retention pass would keep and delete, and why: one query, then one pass in memory per resource. */
  private async decide(ctx: RequestContext, policy: Policy): Promise<RetentionDecision[]> {
    const all = await this.candidates(ctx, policy);
    const byResource = new Map<string, RetentionCandidate[]>();
    for (const c of all) {
      const list = byResource.get(c.resource_id) ?? [];
      if (!list.length) byResource.set(c.resource_id, list);
      list.push({ id: c.id, resourceId: c.resource_id, createdAt: c.created_at, status: c.status, trigger: c.trigger, policyId: c.policy_id, imageDepends: c.image_depends });
    }
    const now = ctx.now();
    const decisions: RetentionDecision[] = [];
    for (const list of byResource.values()) decisions.push(...decideRetention(list, policy.id, policy, policy.timezone, now));
    return decisions;
  }

  /** What the next retention pass would keep and delete, and why, over every bound resource. */
  async preview(ctx: RequestContext, policy: Policy): Promise<(RetentionDecision & { backup: Backup | null })[]> {
    const decisions = await this.decide(ctx, policy);
    const backups = await ctx.loaders.backup.loadMany(decisions.map((d) => d.backupId));
    return decisions.map((d, i) => ({ ...d, backup: backups[i] instanceof Error ? null : (backups[i] as Backup | null) }));
  }

  /** Retention of one policy, counted on its latest run. */
  async retainPolicy(ctx: RequestContext, policyId: string): Promise<number> {
    const policy = await ctx.ds.getRepository(Policy).findOneBy({ id: policyId, projectId: ctx.projectId });
    if (!policy) return 0;
    const latest = await ctx.ds.getRepository(PolicyRun).findOne({ where: { policyId }, order: { createdAt: "DESC" } });
    const deleted = await this.retain(ctx, policy);
    if (latest && deleted) await ctx.ds.query(`UPDATE policy_runs SET deleted_count = deleted_count + $2 WHERE id = $1`, [latest.id, deleted]);
    return deleted;
  }

  /**
   * Deletes what retention does not keep, by deleteBackup's rules, all in one
   * transaction of a fixed number of statements. Returns how many.
   */
  async retain(ctx: RequestContext, policy: Policy, run?: PolicyRun): Promise<number> {
    if (!hasRules(policy)) return 0;
    const doomed = (await this.decide(ctx, policy)).filter((d) => !d.keep).map((d) => d.backupId);
    if (!doomed.length) return 0;
    // Taken by something else meanwhile (restored, deleted, an image made of it): left out, and the next pass decides again.
    const jobs = await ctx.ds.transaction((em) => this.backups.deleteManyIn(em, ctx, doomed, { policyId: policy.id }));
    await this.queue.announce(...jobs);
    if (run && jobs.length) await ctx.ds.query(`UPDATE policy_runs SET deleted_count = deleted_count + $2 WHERE id = $1`, [run.id, jobs.length]);
    ctx.invalidate();
    return jobs.length;
  }
}
