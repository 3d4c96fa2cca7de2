import { CaptureGate } from "../storage/capture-gate";
import { captureSourceSql, lockDisk, restoreAsClone, runningHydration } from "../storage/clones";
import { In, type EntityManager } from "typeorm";
import crypto from "node:crypto";
import { rows } from "../db/sql";
import { Backup, BackupResourceType, BackupStatus, BackupTrigger, Disk, DiskStatus, DiskType, Image, ImageStatus, ImageType, Job, JobType, Server, ServerStatus } from "../entities";
import type { NewJob } from "../domain/jobs";
import * as backupStatus from "../domain/status/backup";
import * as diskStatus from "../domain/status/disk";
import * as serverStatus from "../domain/status/server";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badInput, conflict, DomainError, failedPrecondition, notFound } from "../domain/errors";
import { decodeId, fromGlobalId, shortId, toGlobalId } from "./global-id";
import type { JobQueue } from "./job-queue";
import type { NbdService } from "./nbd.service";
import type { ListName } from "./lists";
import { likeSubstring, type Condition, type PageArgs, type ListSelection } from "./pagination";
import { derivedName, description as validDescription, resourceName } from "./validate";

export interface BackupFilter {
  statuses?: BackupStatus[] | null;
  resourceTypes?: BackupResourceType[] | null;
  triggers?: BackupTrigger[] | null;
  name?: string | null;
  resourceId?: string | null;
  policyId?: string | null;
  /** Only top-level backups (a server backup, not its per-disk children). */
  topLevel?: boolean | null;
}

export interface CreateBackupInput {
  resourceId: string;
  name?: string | null;
  description?: string | null;
}

export interface RestoreBackupInput {
  backupId: string;
  targetDiskId?: string | null;
  mappings?: { backupId: string; diskId: string }[] | null;
  powerOn?: boolean | null;
  hydrate?: boolean | null;
}

export function backupConditions(filter: BackupFilter | null | undefined): Condition[] {
  const out: Condition[] = [];
  if (!filter) return out;
  if (filter.statuses?.length) out.push({ sql: "t.status = ANY($1)", params: [filter.statuses] });
  if (filter.resourceTypes?.length) out.push({ sql: "t.resource_type = ANY($1)", params: [filter.resourceTypes] });
  if (filter.triggers?.length) out.push({ sql: "t.trigger = ANY($1)", params: [filter.triggers] });
  if (filter.name) out.push({ sql: "t.name ILIKE $1", params: [likeSubstring(filter.name)] });
  if (filter.resourceId) {
    const parsed = fromGlobalId(filter.resourceId);
    if (!parsed || (parsed.type !== "Server" && parsed.type !== "Disk")) throw badInput("filter.resourceId", "not a Server or Disk ID");
    out.push({ sql: "t.resource_id = $1", params: [parsed.id] });
  }
  if (filter.policyId) out.push({ sql: "t.policy_id = $1", params: [decodeId(filter.policyId, "Policy", "filter.policyId")] });
  if (filter.topLevel != null) out.push({ sql: filter.topLevel ? "t.parent_id IS NULL" : "t.parent_id IS NOT NULL", params: [] });
  return out;
}

/** A resource bound to a policy. */
export interface PolicyTarget {
  id: string;
  type: "SERVER" | "DISK";
  name: string;
}

interface DiskRow {
  id: string;
  name: string;
  status: DiskStatus;
  type: DiskType;
  size_bytes: string;
  used_bytes: string;
  server_id: string | null;
  device: string | null;
  write_version: string;
}

const BUSY_BACKUP = { uq_backups_one_running: "a backup of this resource is already running" };

/**
 * The backup rules (CBR): one backup at a time per resource, no backup of a
 * resource being restored and no restore of one being backed up, whole-server
 * backups taken at one instant, restores only from AVAILABLE backups onto disks
 * at least as large, never a data-disk backup onto a system disk.
 */
export class BackupService {
  constructor(
    private readonly queue: JobQueue,
    private readonly nbd: NbdService,
    /** Backups capture disks through it, so writes acknowledged before their instant are in them. */
    readonly capture: CaptureGate = new CaptureGate(),
  ) {}

  list(ctx: RequestContext, list: (ListName & `${string}ackups`) | "backupChildren", key: string, args: PageArgs & { filter?: BackupFilter | null }, select?: ListSelection) {
    return ctx.loaders.connection(list, key, args, backupConditions(args.filter), select);
  }

  async get(ctx: RequestContext, globalId: string, field = "id"): Promise<Backup> {
    const backup = await ctx.loaders.backup.load(decodeId(globalId, "Backup", field));
    if (!backup) throw notFound("backup", globalId);
    return backup;
  }

  /** Takes a backup now: the disks' block maps are captured in this transaction; the job copies their data into the vault. */
  async create(ctx: RequestContext, input: CreateBackupInput, opts: { trigger?: BackupTrigger; policyId?: string | null } = {}): Promise<{ backup: Backup; job: Job }> {
    const result = await this.capture
      .hold(() => ctx.ds.transaction((em) => this.createIn(em, ctx, input, opts)))
      .catch((err) => {
        throw translateDbError(err, BUSY_BACKUP);
      });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /**
   * The same inside the caller's transaction; the caller announces the job after
   * committing. Every rule is checked before anything is written. A policy run uses
   * createForPolicy, which applies these rules to all its resources at once.
   */
  async createIn(em: EntityManager, ctx: RequestContext, input: CreateBackupInput, opts: { trigger?: BackupTrigger; policyId?: string | null } = {}): Promise<{ backup: Backup; job: Job }> {
    const target = fromGlobalId(input.resourceId);
    if (!target || (target.type !== "Server" && target.type !== "Disk")) throw badInput("resourceId", "not a Server or Disk ID");
    const name = input.name == null ? null : resourceName(input.name, "name");
    const desc = validDescription(input.description, "description");
    const trigger = opts.trigger ?? BackupTrigger.MANUAL;
    const prefix = trigger === BackupTrigger.POLICY ? "autobk" : "manualbk";

    let server: Server | null = null;
    let disks: Disk[];
    if (target.type === "Server") {
      server = await em.findOne(Server, { where: { id: target.id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!server) throw notFound("server", input.resourceId);
      if (server.status === ServerStatus.RESTORING) throw conflict("the server is being restored; back it up when the restore has finished");
      if (server.status === ServerStatus.BUILDING || server.status === ServerStatus.ERROR) throw failedPrecondition(`cannot back up a server that is ${server.status}`);
      disks = await em.find(Disk, { where: { serverId: server.id, projectId: ctx.projectId }, order: { device: "ASC" }, lock: { mode: "pessimistic_write" } });
    } else {
      const disk = await em.findOne(Disk, { where: { id: target.id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!disk) throw notFound("disk", input.resourceId);
      disks = [disk];
    }
    for (const d of disks) {
      if (d.status === DiskStatus.RESTORING) throw conflict(`disk ${d.name} is being restored; back it up when the restore has finished`);
      if (d.status === DiskStatus.CREATING || d.status === DiskStatus.ERROR) throw failedPrecondition(`cannot back up disk ${d.name} while it is ${d.status}`);
    }
    // Distinct ids: a repeated one turns Postgres away from the partial index on running backups.
    const running = await em.find(Backup, { where: { resourceId: In([...new Set([target.id, ...disks.map((d) => d.id)])]), status: BackupStatus.CREATING } });
    if (running.length) throw conflict("a backup of this resource is already running; one backup at a time");

    const job = await this.queue.add(em, ctx.projectId, { type: JobType.BACKUP, serverId: server?.id ?? null, diskId: server ? null : disks[0].id, policyId: opts.policyId ?? null });
    const base = {
      projectId: ctx.projectId,
      description: desc,
      status: BackupStatus.CREATING,
      trigger,
      policyId: opts.policyId ?? null,
      jobId: job.id,
      completedAt: null,
      error: null,
    };
    let top: Backup;
    if (server) {
      top = em.create(Backup, { ...base, name: "", resourceType: BackupResourceType.SERVER, resourceId: server.id, resourceName: server.name, serverId: server.id, diskId: null, parentId: null });
      top = await em.save(top);
      top.name = name ?? `${prefix}_${shortId(top.id)}`;
      let total = 0;
      for (const d of disks) {
        const child = await em.save(
          em.create(Backup, {
            ...base,
            name: derivedName(top.name, `-${d.device?.replace("/dev/", "") ?? shortId(d.id)}`),
            resourceType: BackupResourceType.DISK,
            resourceId: d.id,
            resourceName: d.name,
            serverId: server.id,
            diskId: d.id,
            parentId: top.id,
          }),
        );
        total += await this.snapshot(em, child, d);
      }
      top.sizeBytes = total;
      top.diskSizeBytes = disks.reduce((n, d) => n + d.sizeBytes, 0);
      top = await em.save(top);
    } else {
      const d = disks[0];
      top = await em.save(em.create(Backup, { ...base, name: "", resourceType: BackupResourceType.DISK, resourceId: d.id, resourceName: d.name, serverId: d.serverId, diskId: d.id, parentId: null }));
      top.name = name ?? `${prefix}_${shortId(top.id)}`;
      await this.snapshot(em, top, d);
      top = await em.save(top);
    }
    job.backupId = top.id;
    await em.update("jobs", { id: job.id }, { backupId: top.id });
    return { backup: top, job };
  }

  /**
   * A policy run's backups of many resources at once, under the same rules as
   * createIn and in the caller's transaction, in a fixed number of statements
   * however many resources: a resource the rules refuse is returned in `skipped`
   * with the reason createIn would give, the others get their backups and jobs.
   * Resources go in the order given; a disk backed up here makes a later server
   * holding it busy, as it would one createIn after another.
   */
  async createForPolicy(em: EntityManager, ctx: RequestContext, policyId: string, targets: PolicyTarget[]): Promise<{ jobs: Job[]; skipped: { target: PolicyTarget; reason: string }[] }> {
    const serverIds = targets.filter((t) => t.type === "SERVER").map((t) => t.id);
    const diskIds = targets.filter((t) => t.type === "DISK").map((t) => t.id);
    const servers = new Map(
      (serverIds.length
        ? await rows<{ id: string; name: string; status: ServerStatus }>(em, `SELECT id, name, status FROM servers WHERE id = ANY($1) AND project_id = $2 ORDER BY id FOR UPDATE`, [
            serverIds,
            ctx.projectId,
          ])
        : []
      ).map((s) => [s.id, s]),
    );
    const diskRows = await rows<DiskRow>(
      em,
      `SELECT id, name, status, type, size_bytes, used_bytes, server_id, device, write_version FROM disks
        WHERE (server_id = ANY($1) OR id = ANY($2)) AND project_id = $3 ORDER BY id FOR UPDATE`,
      [[...servers.keys()], diskIds, ctx.projectId],
    );
    const disks = new Map(diskRows.map((d) => [d.id, d]));
    const disksOf = new Map<string, DiskRow[]>();
    for (const d of diskRows) if (d.server_id && servers.has(d.server_id)) disksOf.set(d.server_id, [...(disksOf.get(d.server_id) ?? []), d]);
    // As createIn's order by device: nulls last.
    for (const list of disksOf.values()) list.sort((a, b) => (a.device === b.device ? 0 : a.device === null ? 1 : b.device === null ? -1 : a.device < b.device ? -1 : 1));
    const busy = new Set(
      (
        await rows<{ resource_id: string }>(em, `SELECT DISTINCT resource_id FROM backups WHERE resource_id = ANY($1) AND status = '${BackupStatus.CREATING}'`, [
          [...new Set([...targets.map((t) => t.id), ...disks.keys()])],
        ])
      ).map((r) => r.resource_id),
    );

    const skipped: { target: PolicyTarget; reason: string }[] = [];
    const planned: { target: PolicyTarget; server: { id: string; name: string } | null; disks: DiskRow[] }[] = [];
    // Space is checked, as createIn does, once a resource has passed the other rules.
    let space: Promise<string | null> | undefined;
    for (const t of targets) {
      const server = t.type === "SERVER" ? servers.get(t.id) : undefined;
      const own = t.type === "SERVER" ? (disksOf.get(t.id) ?? []) : [disks.get(t.id)].filter((d): d is DiskRow => d !== undefined);
      const reason = this.refusal(t, server, own, busy) ?? (await (space ??= this.spaceRefusal()));
      if (reason) {
        skipped.push({ target: t, reason });
        continue;
      }
      planned.push({ target: t, server: server ?? null, disks: own });
      busy.add(t.id);
      for (const d of own) busy.add(d.id);
    }
    if (!planned.length) return { jobs: [], skipped };

    const snapshotted = planned.flatMap((p) => p.disks.map((d) => d.id));
    const bases = new Map(
      (
        await rows<{ disk_id: string; id: string; snapshot_version: string }>(
          em,
          `SELECT d.id AS disk_id, b.id, b.snapshot_version FROM disks d
             CROSS JOIN LATERAL (SELECT id, snapshot_version FROM backups WHERE resource_id = d.id AND resource_type = 'DISK' AND status IN ('AVAILABLE', 'RESTORING')
                                    AND snapshot_version >= d.backup_floor
                                  ORDER BY snapshot_version DESC, created_at DESC LIMIT 1) b
            WHERE d.id = ANY($1::uuid[])`,
          [snapshotted],
        )
      ).map((b) => [b.disk_id, b]),
    );

    const description = validDescription(undefined, "description");
    const backupRows: Record<string, unknown>[] = [];
    const blocks: { backup_id: string; disk_id: string; since: number; has_base: boolean }[] = [];
    const jobSpecs: (NewJob & { id: string })[] = [];
    const common = { status: BackupStatus.CREATING, trigger: BackupTrigger.POLICY, policy_id: policyId, description };
    const diskBackup = (id: string, d: DiskRow, extra: Record<string, unknown>) => {
      const base = bases.get(d.id);
      blocks.push({ backup_id: id, disk_id: d.id, since: base ? Number(base.snapshot_version) : -1, has_base: Boolean(base) });
      return {
        ...common,
        ...extra,
        id,
        resource_type: BackupResourceType.DISK,
        resource_id: d.id,
        resource_name: d.name,
        disk_id: d.id,
        base_id: base?.id ?? null,
        snapshot_version: Number(d.write_version),
        disk_size_bytes: Number(d.size_bytes),
        disk_type: d.type,
        device: d.device,
        size_bytes: Number(d.used_bytes),
      };
    };
    for (const p of planned) {
      const jobId = crypto.randomUUID();
      const topId = crypto.randomUUID();
      const name = `autobk_${shortId(topId)}`;
      jobSpecs.push({ id: jobId, type: JobType.BACKUP, serverId: p.server?.id ?? null, diskId: p.server ? null : p.disks[0].id, backupId: topId, policyId });
      if (p.server) {
        backupRows.push({
          ...common,
          id: topId,
          name,
          job_id: jobId,
          resource_type: BackupResourceType.SERVER,
          resource_id: p.server.id,
          resource_name: p.server.name,
          server_id: p.server.id,
          disk_id: null,
          parent_id: null,
          size_bytes: p.disks.reduce((n, d) => n + Number(d.used_bytes), 0),
          disk_size_bytes: p.disks.reduce((n, d) => n + Number(d.size_bytes), 0),
        });
        for (const d of p.disks) {
          const suffix = `-${d.device?.replace("/dev/", "") ?? shortId(d.id)}`;
          backupRows.push(diskBackup(crypto.randomUUID(), d, { name: derivedName(name, suffix), job_id: jobId, server_id: p.server.id, parent_id: topId }));
        }
      } else {
        const d = p.disks[0];
        backupRows.push(diskBackup(topId, d, { name, job_id: jobId, server_id: d.server_id, parent_id: null }));
      }
    }

    // The jobs point at their backups and the backups at their jobs: one statement writes both.
    const jobs = await this.queue.addMany(em, ctx.projectId, jobSpecs, {
      sql: `INSERT INTO backups (id, project_id, name, description, resource_type, resource_id, resource_name, server_id, disk_id, status, trigger, policy_id, parent_id, job_id,
                                 base_id, snapshot_version, disk_size_bytes, disk_type, device, size_bytes)
            SELECT x.id, $1, x.name, x.description, x.resource_type, x.resource_id, x.resource_name, x.server_id, x.disk_id, x.status, x.trigger, x.policy_id, x.parent_id, x.job_id,
                   x.base_id, x.snapshot_version, x.disk_size_bytes, x.disk_type, x.device, coalesce(x.size_bytes, 0)
              FROM jsonb_to_recordset($3::jsonb) AS x(id uuid, name text, description text, resource_type text, resource_id uuid, resource_name text, server_id uuid, disk_id uuid,
                   status text, trigger text, policy_id uuid, parent_id uuid, job_id uuid, base_id uuid, snapshot_version bigint, disk_size_bytes bigint, disk_type text, device text, size_bytes bigint)`,
      params: [JSON.stringify(backupRows)],
    });
    await em.query(
      `INSERT INTO backup_blocks (backup_id, block_index, hash, src_segment, src_offset)
       SELECT x.backup_id, b.block_index, b.hash, b.segment_id, b.segment_offset
         FROM jsonb_to_recordset($1::jsonb) AS x(backup_id uuid, disk_id uuid, since bigint, has_base boolean)
         JOIN disk_blocks b ON b.disk_id = x.disk_id AND b.version > x.since AND (x.has_base OR b.hash IS NOT NULL)`,
      [JSON.stringify(blocks)],
    );
    // A clone's first backup also names the blocks it still reads from its source: chunks the vault holds already.
    if (blocks.some((b) => !b.has_base)) {
      await em.query(
        captureSourceSql(
          "backup_blocks",
          "backup_id",
          `SELECT x.backup_id AS owner, x.disk_id FROM jsonb_to_recordset($1::jsonb) AS x(backup_id uuid, disk_id uuid, has_base boolean) WHERE NOT x.has_base`,
        ),
        [JSON.stringify(blocks)],
      );
    }
    const order = new Map(jobSpecs.map((j, i) => [j.id, i]));
    return { jobs: jobs.sort((a, b) => order.get(a.id)! - order.get(b.id)!), skipped };
  }

  /** NO_SPACE's message when backups may not start for lack of space, else null. */
  private async spaceRefusal(): Promise<string | null> {
    try {
      await this.queue.checkSpaceFor(JobType.BACKUP);
      return null;
    } catch (err) {
      if (!(err instanceof DomainError)) throw err;
      return err.message;
    }
  }

  /** Why createIn would refuse this resource (its server and disks locked and read), or null. */
  private refusal(t: PolicyTarget, server: { status: ServerStatus } | undefined, disks: DiskRow[], busy: Set<string>): string | null {
    const gid = toGlobalId(t.type === "SERVER" ? "Server" : "Disk", t.id);
    if (t.type === "SERVER") {
      if (!server) return notFound("server", gid).message;
      if (server.status === ServerStatus.RESTORING) return conflict("the server is being restored; back it up when the restore has finished").message;
      if (server.status === ServerStatus.BUILDING || server.status === ServerStatus.ERROR) return failedPrecondition(`cannot back up a server that is ${server.status}`).message;
    } else if (!disks.length) return notFound("disk", gid).message;
    for (const d of disks) {
      if (d.status === DiskStatus.RESTORING) return conflict(`disk ${d.name} is being restored; back it up when the restore has finished`).message;
      if (d.status === DiskStatus.CREATING || d.status === DiskStatus.ERROR) return failedPrecondition(`cannot back up disk ${d.name} while it is ${d.status}`).message;
    }
    if (busy.has(t.id) || disks.some((d) => busy.has(d.id))) return conflict("a backup of this resource is already running; one backup at a time").message;
    return null;
  }

  /**
   * Captures a disk at this instant: the blocks changed since its latest backup
   * (the base) become this backup's rows, still pointing at their volume segments
   * until the job has copied them into the vault. Returns the bytes the backup holds.
   */
  private async snapshot(em: EntityManager, backup: Backup, disk: Disk): Promise<number> {
    const [base] = await rows<{ id: string; snapshot_version: string }>(
      em,
      `SELECT id, snapshot_version FROM backups WHERE resource_id = $1 AND resource_type = 'DISK' AND status IN ('AVAILABLE', 'RESTORING') AND snapshot_version >= $2
        ORDER BY snapshot_version DESC, created_at DESC LIMIT 1`,
      [disk.id, disk.backupFloor],
    );
    await em.query(
      `INSERT INTO backup_blocks (backup_id, block_index, hash, src_segment, src_offset)
       SELECT $1, block_index, hash, segment_id, segment_offset FROM disk_blocks
        WHERE disk_id = $2 AND version > $3 AND ($4 OR hash IS NOT NULL)`,
      [backup.id, disk.id, base ? Number(base.snapshot_version) : -1, Boolean(base)],
    );
    // A clone's first backup also names the blocks it still reads from its source: chunks the vault holds already.
    if (!base) await em.query(captureSourceSql("backup_blocks", "backup_id", `SELECT $1::uuid AS owner, $2::uuid AS disk_id`), [backup.id, disk.id]);
    backup.baseId = base?.id ?? null;
    backup.snapshotVersion = disk.writeVersion;
    backup.diskSizeBytes = disk.sizeBytes;
    backup.diskType = disk.type;
    backup.device = disk.device;
    backup.sizeBytes = disk.usedBytes;
    await em.save(backup);
    return disk.usedBytes;
  }

  async restore(ctx: RequestContext, input: RestoreBackupInput): Promise<{ backup: Backup; job: Job }> {
    const backupId = decodeId(input.backupId, "Backup", "backupId");
    const powerOn = input.powerOn ?? true;
    const result = await ctx.ds.transaction(async (em) => {
      const backup = await em.findOne(Backup, { where: { id: backupId, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!backup) throw notFound("backup", input.backupId);
      this.checkRestorable(backup);
      const children =
        backup.resourceType === BackupResourceType.SERVER ? await em.find(Backup, { where: { parentId: backup.id }, order: { device: "ASC" }, lock: { mode: "pessimistic_write" } }) : [];

      let pairs: { source: Backup; diskId: string; field: string }[];
      if (backup.resourceType === BackupResourceType.DISK) {
        if (input.mappings?.length) throw badInput("mappings", "mappings are for server backups; use targetDiskId for a disk backup");
        const diskId = input.targetDiskId ? decodeId(input.targetDiskId, "Disk", "targetDiskId") : backup.diskId;
        if (!diskId) throw failedPrecondition("the backed-up disk no longer exists; give targetDiskId");
        pairs = [{ source: backup, diskId, field: input.targetDiskId ? "targetDiskId" : "backupId" }];
      } else {
        if (input.targetDiskId) throw badInput("targetDiskId", "a server backup restores through mappings, one per disk backup");
        if (input.mappings?.length) {
          pairs = input.mappings.map((m, i) => {
            const childId = decodeId(m.backupId, "Backup", `mappings[${i}].backupId`);
            const source = children.find((c) => c.id === childId);
            if (!source) throw badInput(`mappings[${i}].backupId`, "not a disk backup of this server backup");
            return { source, diskId: decodeId(m.diskId, "Disk", `mappings[${i}].diskId`), field: `mappings[${i}].diskId` };
          });
        } else {
          pairs = children.map((c) => {
            if (!c.diskId) throw failedPrecondition(`the disk of ${c.name} no longer exists; give mappings`);
            return { source: c, diskId: c.diskId, field: "mappings" };
          });
        }
        const targets = new Set(pairs.map((p) => p.diskId));
        if (targets.size !== pairs.length) throw badInput("mappings", "each disk can be the target of one disk backup");
        const damaged = pairs.find((p) => p.source.status === BackupStatus.ERROR);
        if (damaged) throw failedPrecondition(`backup ${damaged.source.name} is damaged (${damaged.source.error ?? "ERROR"}); restore another backup`);
      }

      const diskIds = pairs.map((p) => p.diskId);
      // The disks' write locks before their rows, in the order writers take them: a write commits wholly before the restore or after it.
      for (const id of [...diskIds].sort()) await lockDisk(em, id);
      const disks = await em.find(Disk, { where: { id: In(diskIds), projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      const serverIds = new Set<string>();
      for (const p of pairs) {
        const disk = disks.find((d) => d.id === p.diskId);
        if (!disk) throw notFound("disk", toGlobalId("Disk", p.diskId));
        if (disk.status === DiskStatus.RESTORING || disk.status === DiskStatus.CREATING) throw conflict(`disk ${disk.name} is busy (${disk.status})`);
        if (p.source.diskType === DiskType.DATA && disk.type === DiskType.SYSTEM) throw failedPrecondition(`a data-disk backup cannot be restored onto the system disk ${disk.name}`);
        if (disk.sizeBytes < (p.source.diskSizeBytes ?? 0)) {
          throw failedPrecondition(`disk ${disk.name} (${disk.sizeBytes} bytes) is smaller than the backed-up disk (${p.source.diskSizeBytes} bytes)`);
        }
        if (disk.serverId) serverIds.add(disk.serverId);
      }
      const busy = await em.find(Backup, { where: { resourceId: In([...disks.map((d) => d.id), ...serverIds]), status: BackupStatus.CREATING } });
      if (busy.length) throw conflict("a backup of the target is running; restore when it has finished");
      const hydrating = await runningHydration(em, ctx.projectId, diskIds);
      if (hydrating) throw conflict(`a target disk is being hydrated by job ${toGlobalId("Job", hydrating)}; cancel it or restore when it has finished`);
      if (serverIds.size > 1) throw badInput("mappings", "all target disks must belong to one server");
      const serverId = [...serverIds][0] ?? null;
      if (serverId) {
        const server = await em.findOne(Server, { where: { id: serverId }, lock: { mode: "pessimistic_write" } });
        if (!server) throw notFound("server");
        if (server.status === ServerStatus.RESTORING || server.status === ServerStatus.BUILDING) throw conflict(`the server is busy (${server.status})`);
      }
      // Each disk reads as its backup once this commits; nothing is copied. A client of the
      // disk's old bytes over NBD is cut off (as when the server is stopped for the restore).
      for (const p of pairs) await restoreAsClone(em, p.diskId, p.source);
      await this.nbd.revokeDisks(em, diskIds);
      // A disk in ERROR is whole again.
      for (const d of disks) await diskStatus.markRestored(em, d.id, d.serverId ? DiskStatus.IN_USE : DiskStatus.AVAILABLE);
      if (serverId) await serverStatus.markRestored(em, serverId, powerOn);
      // The job records the restore and, with hydrate, copies the disks' blocks into their own storage.
      const job = await this.queue.add(em, ctx.projectId, {
        type: JobType.RESTORE,
        backupId: backup.id,
        serverId,
        diskId: pairs.length === 1 ? pairs[0].diskId : null,
        payload: { hydrate: input.hydrate ? diskIds : [] },
      });
      await em.update(Backup, { id: backup.id }, { jobId: job.id });
      backup.jobId = job.id;
      return { backup, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /**
   * A new data disk reading as a disk backup (createDisk with backupId), at once: a clone
   * whose blocks come from the backup's chain in the vault until written. Nothing is
   * copied and nothing is written per block; with `hydrate`, a job copies the blocks into
   * the disk's own storage in the background while it is in use.
   */
  async createDisk(ctx: RequestContext, input: { name: string; sizeBytes?: number | null; backupId: string; hydrate?: boolean | null }, maxBytes: number): Promise<{ disk: Disk; job: Job | null }> {
    const name = resourceName(input.name, "name");
    const backupId = decodeId(input.backupId, "Backup", "backupId");
    const result = await ctx.ds.transaction(async (em) => {
      const backup = await em.findOne(Backup, { where: { id: backupId, projectId: ctx.projectId }, lock: { mode: "pessimistic_read" } });
      if (!backup) throw notFound("backup", input.backupId);
      if (backup.resourceType !== BackupResourceType.DISK) throw badInput("backupId", "a server backup holds several disks; use one of its children");
      this.checkClonable(backup);
      const source = backup.diskSizeBytes ?? 0;
      const size = input.sizeBytes ?? source;
      if (size < source) throw badInput("sizeBytes", `must be at least the backed-up disk's ${source} bytes`);
      if (size > maxBytes || size % (1024 * 1024) !== 0) throw badInput("sizeBytes", `must be a whole number of MiB up to ${maxBytes} bytes`);
      const disk = await em.save(
        em.create(Disk, {
          projectId: ctx.projectId,
          name,
          type: DiskType.DATA,
          sizeBytes: size,
          usedBytes: backup.sizeBytes,
          status: DiskStatus.AVAILABLE,
          serverId: null,
          device: null,
          sourceImageId: null,
          sourceBackupId: backup.id,
          cloneBackupId: backup.id,
        }),
      );
      const job = input.hydrate ? await this.queue.add(em, ctx.projectId, { type: JobType.CREATE_DISK, backupId: backup.id, diskId: disk.id, payload: { hydrate: [disk.id] } }) : null;
      return { disk, job };
    });
    if (result.job) await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /** A disk backup a new disk may read from: one of its own (a child of a server backup is one too), AVAILABLE or being restored from. */
  private checkClonable(backup: Backup) {
    if (backup.status === BackupStatus.CREATING || backup.status === BackupStatus.DELETING) throw conflict(`the backup is ${backup.status}; try again when it is AVAILABLE`);
    if (backup.status !== BackupStatus.AVAILABLE && backup.status !== BackupStatus.RESTORING) throw failedPrecondition(`only AVAILABLE backups make disks; this one is ${backup.status}`);
  }

  private checkRestorable(backup: Backup) {
    if (backup.parentId) throw failedPrecondition("this disk backup is part of a server backup; restore the server backup with mappings");
    if (backup.status === BackupStatus.CREATING || backup.status === BackupStatus.RESTORING || backup.status === BackupStatus.DELETING) {
      throw conflict(`the backup is ${backup.status}; try again when it is AVAILABLE`);
    }
    if (backup.status !== BackupStatus.AVAILABLE) throw failedPrecondition(`only AVAILABLE backups restore; this one is ${backup.status}`);
  }

  async delete(ctx: RequestContext, globalId: string, opts: { policyId?: string } = {}): Promise<{ backup: Backup; job: Job }> {
    const id = decodeId(globalId, "Backup", "id");
    const result = await ctx.ds.transaction(async (em) => {
      const backup = await em.findOne(Backup, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!backup) throw notFound("backup", globalId);
      if (backup.parentId) throw failedPrecondition("this disk backup is part of a server backup; delete the server backup");
      if (backup.status === BackupStatus.CREATING || backup.status === BackupStatus.RESTORING || backup.status === BackupStatus.DELETING) {
        throw conflict(`the backup is ${backup.status}; cancel its job or wait until it has finished`);
      }
      const image = await em.findOne(Image, { where: { sourceBackupId: backup.id, type: ImageType.FULL_SERVER, projectId: ctx.projectId } });
      if (image && image.status !== ImageStatus.KILLED) {
        throw failedPrecondition(`the FULL_SERVER image ${image.name} depends on this backup; delete the image first`);
      }
      await backupStatus.markDeleting(em, backup.id);
      const job = await this.queue.add(em, ctx.projectId, {
        type: JobType.DELETE_BACKUP,
        backupId: backup.id,
        serverId: backup.serverId,
        diskId: backup.resourceType === BackupResourceType.DISK ? backup.diskId : null,
        policyId: opts.policyId ?? null,
      });
      backup.status = BackupStatus.DELETING;
      return { backup, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }

  /**
   * deleteBackup for many top-level backups at once, inside the caller's transaction
   * and in a fixed number of statements. One deleteBackup would refuse is left out.
   * Returns the jobs; the caller announces them after committing.
   */
  async deleteManyIn(em: EntityManager, ctx: RequestContext, ids: string[], opts: { policyId?: string } = {}): Promise<Job[]> {
    const taken = await backupStatus.markDeletingMany(em, ctx.projectId, ids);
    return this.queue.addMany(
      em,
      ctx.projectId,
      taken.map((b) => ({
        type: JobType.DELETE_BACKUP,
        backupId: b.id,
        serverId: b.server_id,
        diskId: b.resource_type === BackupResourceType.DISK ? b.disk_id : null,
        policyId: opts.policyId ?? null,
      })),
    );
  }

  async verify(ctx: RequestContext, globalId: string): Promise<{ backup: Backup; job: Job }> {
    const id = decodeId(globalId, "Backup", "id");
    const result = await ctx.ds.transaction(async (em) => {
      const backup = await em.findOne(Backup, { where: { id, projectId: ctx.projectId }, lock: { mode: "pessimistic_write" } });
      if (!backup) throw notFound("backup", globalId);
      if (backup.status !== BackupStatus.AVAILABLE && backup.status !== BackupStatus.ERROR) {
        throw conflict(`the backup is ${backup.status}; verify it when it is AVAILABLE`);
      }
      if (!backup.completedAt) throw failedPrecondition("the backup never completed; there is nothing to verify");
      const job = await this.queue.add(em, ctx.projectId, { type: JobType.VERIFY_BACKUP, backupId: backup.id, serverId: backup.serverId, diskId: backup.diskId });
      return { backup, job };
    });
    await this.queue.announce(result.job);
    ctx.invalidate();
    return result;
  }
}
