import { JobStatus, JobType, type DiskStatus, type Job } from "../entities";
import type { FormatName } from "../formats";

/**
 * Where services and job handlers meet. A service enqueues a job with the payload
 * its type names here; the runner hands the handler of that type the job with the
 * payload already typed. Neither side reaches into the other's modules.
 */

/**
 * Why a job failed, as the API shows it (`Job.error`, `Image.error`,
 * `ImageExport.error`, `Backup.error`). INTERNAL is for bugs only. GraphQL shows
 * the code as a string.
 */
export enum FailureCode {
  NO_SPACE = "NO_SPACE",
  BAD_IMAGE = "BAD_IMAGE",
  TOO_LARGE = "TOO_LARGE",
  CORRUPT_CHUNK = "CORRUPT_CHUNK",
  UPLOAD_GONE = "UPLOAD_GONE",
  IMAGE_GONE = "IMAGE_GONE",
  BACKUP_GONE = "BACKUP_GONE",
  BACKUP_FAILED = "BACKUP_FAILED",
  VERIFY_FAILED = "VERIFY_FAILED",
  INCOMPLETE = "INCOMPLETE",
  INTERRUPTED = "INTERRUPTED",
  CANCELLED = "CANCELLED",
  INTERNAL = "INTERNAL",
}

/** A job in one of these never changes again. */
export const TERMINAL_JOB_STATUSES: readonly JobStatus[] = [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED];

export const isTerminal = (status: JobStatus): boolean => TERMINAL_JOB_STATUSES.includes(status);

/** The same as an SQL list, for `status IN (…)`. */
export const TERMINAL_JOB_STATUSES_SQL = TERMINAL_JOB_STATUSES.map((s) => `'${s}'`).join(", ");

/** What a RESTORE or CREATE_DISK job does: each disk backup or image disk onto its disk. */
export interface RestorePlan {
  targets: { backupId?: string; imageDiskId?: string; diskId: string }[];
  serverId: string | null;
  powerOn: boolean;
  /** Status each target disk returns to when the restore ends. */
  diskStatus: Record<string, DiskStatus>;
  /** Status each target disk had before a restore: it keeps it when the restore fails (its bytes do not change). */
  diskStatusBefore?: Record<string, DiskStatus>;
}

/** What a CREATE_IMAGE job copies: blocks captured from a disk, or a backup to wait for. */
export interface CreateImagePayload {
  /** The disk whose volume holds pending blocks (image from a server or disk). */
  sourceDiskId?: string;
  /** A server backup being taken for a FULL_SERVER image; the job waits for it. */
  awaitBackupId?: string;
}

/** Nothing beyond the job's resource columns. */
type NoPayload = Record<string, never>;

/** The payload of each job type (the `jobs.payload` column). */
export interface JobPayloads {
  [JobType.BACKUP]: NoPayload;
  /** `hydrate`: the restored disks whose blocks are copied into their own storage (none: the restore was all done when it was asked for); a plan: a staged copy, as queued before restores were instant. */
  [JobType.RESTORE]: { plan: RestorePlan } | { hydrate: string[] };
  /** `hydrate`: the clones whose source blocks are copied into their own storage (a plan: a copy into a new disk, as queued before clones). */
  [JobType.CREATE_DISK]: { plan: RestorePlan } | { hydrate: string[] };
  [JobType.DELETE_BACKUP]: NoPayload;
  [JobType.VERIFY_BACKUP]: NoPayload;
  [JobType.CREATE_IMAGE]: CreateImagePayload;
  [JobType.IMPORT_IMAGE]: { uploadId: string; format: FormatName };
  [JobType.EXPORT_IMAGE]: { format: FormatName };
}

export type PayloadOf<T extends JobType> = JobPayloads[T];

/** The resource columns a job of each type always has (a BACKUP job's backup is recorded in the transaction that queues it). */
interface JobColumns {
  [JobType.BACKUP]: "backupId";
  [JobType.RESTORE]: "backupId";
  [JobType.CREATE_DISK]: never;
  [JobType.DELETE_BACKUP]: "backupId";
  [JobType.VERIFY_BACKUP]: "backupId";
  [JobType.CREATE_IMAGE]: "imageId";
  [JobType.IMPORT_IMAGE]: "imageId";
  [JobType.EXPORT_IMAGE]: "imageId" | "exportId";
}

/**
 * A job of type T, its payload and the resource columns its type always has
 * typed; for a union of types, the union of their jobs, told apart by `type`.
 */
export type JobOf<T extends JobType> = T extends JobType ? Job & { type: T; payload: PayloadOf<T> } & { [K in JobColumns[T]]: string } : never;

/** The resources a job acts on, as columns (for listing jobs by resource and for the API). */
export interface JobResources {
  serverId?: string | null;
  diskId?: string | null;
  backupId?: string | null;
  imageId?: string | null;
  policyId?: string | null;
  exportId?: string | null;
  bytesTotal?: number;
}

/** A job to enqueue: its type, its resources and the payload its type takes (optional where it takes none). */
export type NewJob = {
  [T in JobType]: JobResources & { type: T } & (Record<string, never> extends PayloadOf<T> ? { payload?: PayloadOf<T> } : { payload: PayloadOf<T> });
}[JobType];
