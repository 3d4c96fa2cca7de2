import type { EntityManager } from "typeorm";
import { hydrate, rows } from "../db/sql";
import { Job, JobStatus, JobType } from "../entities";
import type { NewJob } from "../domain/jobs";
import type { EventBus } from "../jobs/events";
import type { FreeSpace } from "../storage/free-space";

/** Jobs that write data, refused when space is short; those that only read or delete free space stay allowed. */
const WRITES_DATA: Record<JobType, boolean> = {
  [JobType.BACKUP]: true,
  [JobType.RESTORE]: true,
  [JobType.CREATE_IMAGE]: true,
  [JobType.IMPORT_IMAGE]: true,
  [JobType.EXPORT_IMAGE]: true,
  [JobType.CREATE_DISK]: true,
  [JobType.DELETE_BACKUP]: false,
  [JobType.VERIFY_BACKUP]: false,
};

/** Whether a job writes data: as its type does, but a restore with nothing to hydrate writes none (its disks read from the vault). */
function writesData(spec: NewJob): boolean {
  const hydrate = (spec.payload as { hydrate?: string[] } | undefined)?.hydrate;
  return WRITES_DATA[spec.type] && !(spec.type === JobType.RESTORE && hydrate?.length === 0);
}

/**
 * Adds jobs inside the caller's transaction, and announces them once it has
 * committed. A job that writes data is refused (NO_SPACE) while the blob stores are
 * short of space, before anything is written, so the caller's transaction stays usable.
 */
export class JobQueue {
  constructor(
    private readonly events: EventBus,
    private readonly space?: FreeSpace,
  ) {}

  /** Throws NO_SPACE when a job of this type may not start for lack of space. */
  async checkSpaceFor(type: JobType): Promise<void> {
    if (WRITES_DATA[type]) await this.space?.check();
  }

  async add(em: EntityManager, projectId: string, spec: NewJob): Promise<Job> {
    if (writesData(spec)) await this.space?.check();
    return em.save(
      em.create(Job, {
        projectId,
        type: spec.type,
        status: JobStatus.QUEUED,
        serverId: spec.serverId ?? null,
        diskId: spec.diskId ?? null,
        backupId: spec.backupId ?? null,
        imageId: spec.imageId ?? null,
        policyId: spec.policyId ?? null,
        exportId: spec.exportId ?? null,
        bytesTotal: spec.bytesTotal ?? 0,
        payload: spec.payload ?? {},
        startedAt: null,
        finishedAt: null,
      }),
    );
  }

  /**
   * Many jobs in one statement (a policy run, a retention pass). `id` may be given so
   * the caller can link rows to a job before it exists. `alongside`, a data-modifying
   * statement whose parameters start at $3, runs as part of the same statement: rows
   * that point at the jobs and that the jobs point at (backups and their BACKUP jobs)
   * go in together, their foreign keys checked at the statement's end. Returns the
   * jobs in no particular order.
   */
  async addMany(em: EntityManager, projectId: string, specs: (NewJob & { id?: string })[], alongside?: { sql: string; params: unknown[] }): Promise<Job[]> {
    if (!specs.length) return [];
    for (const type of new Set(specs.map((s) => s.type))) await this.checkSpaceFor(type);
    const inserted = await rows(
      em,
      `${alongside ? `WITH alongside AS (${alongside.sql}) ` : ""}INSERT INTO jobs (id, project_id, type, status, server_id, disk_id, backup_id, image_id, policy_id, export_id, bytes_total, payload)
       SELECT coalesce(x.id, gen_random_uuid()), $1, x.type, '${JobStatus.QUEUED}', x.server_id, x.disk_id, x.backup_id, x.image_id, x.policy_id, x.export_id, x.bytes_total, x.payload
         FROM jsonb_to_recordset($2::jsonb)
              AS x(id uuid, type text, server_id uuid, disk_id uuid, backup_id uuid, image_id uuid, policy_id uuid, export_id uuid, bytes_total bigint, payload jsonb)
       RETURNING *`,
      [
        projectId,
        JSON.stringify(
          specs.map((s) => ({
            id: s.id ?? null,
            type: s.type,
            server_id: s.serverId ?? null,
            disk_id: s.diskId ?? null,
            backup_id: s.backupId ?? null,
            image_id: s.imageId ?? null,
            policy_id: s.policyId ?? null,
            export_id: s.exportId ?? null,
            bytes_total: s.bytesTotal ?? 0,
            payload: s.payload ?? {},
          })),
        ),
        ...(alongside?.params ?? []),
      ],
    );
    return hydrate(em.connection, Job, inserted);
  }

  async announce(...jobs: Job[]): Promise<void> {
    if (!jobs.length) return;
    await this.events.publishAll(jobs.map((job) => ({ projectId: job.projectId, jobId: job.id, backupId: job.backupId, status: job.status })));
  }
}
