import type { DataSource } from "typeorm";
import { BackupService } from "./backup.service";
import { DiskService } from "./disk.service";
import { ImageService } from "./image.service";
import { JobService } from "./job.service";
import { PolicyRunner, PolicyService } from "./policy.service";
import { ProjectService } from "./project.service";
import { ServerService } from "./server.service";
import { NbdService } from "./nbd.service";

import type { EventBus } from "../jobs/events";
import { MemoryEventBus } from "../jobs/events";
import { JobQueue } from "./job-queue";
import type { FreeSpace } from "../storage/free-space";
import type { UploadStore } from "../storage/uploads";
import { ProgressService } from "./progress";

/** What of the storage the services use: uploads and export files, and the free-space floor. Absent in commands that only touch the database. */
export interface ServiceStorage {
  uploads: UploadStore;
  space: FreeSpace;
}

export function createServices(ds: DataSource, events: EventBus = new MemoryEventBus(), storage?: ServiceStorage) {
  const uploads = storage?.uploads;
  const queue = new JobQueue(events, storage?.space);
  const nbd = new NbdService();
  const backups = new BackupService(queue, nbd);
  const images = new ImageService(queue, backups, uploads);
  return {
    projects: new ProjectService(ds),
    servers: new ServerService(queue, images),
    disks: new DiskService(backups, images, queue, nbd),
    nbd,
    backups,
    images,
    policies: new PolicyService(),
    policyRuns: new PolicyRunner(backups, queue),
    jobs: new JobService(queue),
    progress: new ProgressService(events),
    queue,
  };
}

export type Services = ReturnType<typeof createServices>;
