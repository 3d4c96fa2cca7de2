import { ApiKey } from "./api-key.entity";
import { Backup } from "./backup.entity";
import { Disk } from "./disk.entity";
import { ImageExport } from "./image-export.entity";
import { Image } from "./image.entity";
import { Job } from "./job.entity";
import { NbdExport } from "./nbd-export.entity";
import { PolicyBinding } from "./policy-binding.entity";
import { PolicyRun } from "./policy-run.entity";
import { Policy } from "./policy.entity";
import { Project } from "./project.entity";
import { Server } from "./server.entity";

export { ApiKey, Backup, Disk, Image, ImageExport, Job, NbdExport, Policy, PolicyBinding, PolicyRun, Project, Server };
export type { SkippedResource } from "./policy-run.entity";
export * from "./enums";

export const entities = [Project, ApiKey, Server, Disk, Backup, Image, ImageExport, Policy, PolicyBinding, PolicyRun, Job, NbdExport];
