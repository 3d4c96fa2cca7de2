import type { DataSource } from "typeorm";
import { BackupService } from "./backup.service";
import { DiskService } from "./disk.service";
import { ImageService } from "./image.service";
import { JobService } from "./job.service";
import { PolicyService } from "./policy.service";
import { ProjectService } from "./project.service";
import { ServerService } from "./server.service";

export function createServices(ds: DataSource) {
  return {
    projects: new ProjectService(ds),
    servers: new ServerService(),
    disks: new DiskService(),
    backups: new BackupService(),
    images: new ImageService(),
    policies: new PolicyService(),
    jobs: new JobService(),
  };
}

export type Services = ReturnType<typeof createServices>;
