import type { DataSource } from "typeorm";
import { BackupService } from "./backup.service";
import { DiskService } from "./disk.service";
import { ImageService } from "./image.service";
import { JobService } from "./job.service";
import { PolicyService } from "./policy.service";
import { ProjectService } from "./project.service";
import { ServerService } from "./server.service";

import type { EventBus } from "../jobs/events";
import { MemoryEventBus } from "../jobs/events";
import { JobQueue } from "./job-queue";
import { ProgressService } from "./progress";

export function createServices(ds: DataSource, events: EventBus = new MemoryEventBus()) {
  const queue = new JobQueue(events);
  const backups = new BackupService(queue);
  return {
    projects: new ProjectService(ds),
    servers: new ServerService(),
    disks: new DiskService(backups),
    backups,
    images: new ImageService(),
    policies: new PolicyService(),
    jobs: new JobService(queue),
    progress: new ProgressService(events),
  };
}

export type Services = ReturnType<typeof createServices>;
