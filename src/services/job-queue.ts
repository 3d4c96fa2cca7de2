import type { EntityManager } from "typeorm";
import { Job, JobStatus, type JobType } from "../entities";
import type { EventBus } from "../jobs/events";

export interface NewJob {
  type: JobType;
  serverId?: string | null;
  diskId?: string | null;
  backupId?: string | null;
  imageId?: string | null;
  policyId?: string | null;
  exportId?: string | null;
  bytesTotal?: number;
  payload?: Record<string, unknown>;
}

/** Adds jobs inside the caller's transaction, and announces them once it has committed. */
export class JobQueue {
  constructor(private readonly events: EventBus) {}

  async add(em: EntityManager, projectId: string, spec: NewJob): Promise<Job> {
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
