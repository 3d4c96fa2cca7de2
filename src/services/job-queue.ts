import type { EntityManager } from "typeorm";
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
    await this.checkSpaceFor(spec.type);
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

  async announce(...jobs: Job[]): Promise<void> {
    for (const job of jobs) await this.events.publish({ projectId: job.projectId, jobId: job.id, backupId: job.backupId, status: job.status });
  }
}
