import type { DataSource } from "typeorm";
import { BackupService } from "./backup.service";
import { DiskService } from "./disk.service";
import { ImageService } from "./image.service";
import { JobService } from "./job.service";
import { PolicyRunner, PolicyService } from "./policy.service";
import { ProjectService } from "./project.service";
import { ServerService } from "./server.service";

import type { EventBus } from "../jobs/events";
import { MemoryEventBus } from "../jobs/events";
import { JobQueue } from "./job-queue";
import type { UploadStore } from "../storage/uploads";
import { ProgressService } from "./progress";

export function createServices(ds: DataSource, events: EventBus = new MemoryEventBus(), uploads?: UploadStore) {
  const queue = new JobQueue(events);
  const backups = new BackupService(queue);
  const images = new ImageService(queue, backups, uploads);
  return {
    projects: new ProjectService(ds),
    servers: new ServerService(queue, images),
    disks: new DiskService(backups, images, queue),
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
