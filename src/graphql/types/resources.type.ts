import { Field, Float, Int, ObjectType } from "type-graphql";
import { connectionOf } from "./connection";
import {
  BackupResourceType,
  BackupStatus,
  BackupTrigger,
  DiskFormat,
  DiskStatus,
  DiskType,
  ExportStatus,
  ImageSource,
  ImageStatus,
  ImageType,
  JobStatus,
  JobType,
  OsType,
  ServerStatus,
} from "./enums";
import { Backup, Disk, Image, ImageExport, Job, NbdExport, Policy, Project, Server } from "../../entities";
import { Node, sourceEntity } from "./node";
import { DateTime, SafeInt } from "./scalars";

@ObjectType("Server", { simpleResolvers: true, implements: Node, description: "A virtual server (ECS): one system disk and any number of data disks." })
export class ServerType extends Node {
  @Field() name: string;
  @Field(() => ServerStatus) status: ServerStatus;
  @Field(() => Int) vcpus: number;
  @Field(() => OsType) osType: OsType;
  @Field(() => DateTime) createdAt: Date;
  @Field(() => DateTime) updatedAt: Date;
}

@ObjectType("Disk", { simpleResolvers: true, implements: Node, description: "A block device (EVS) of a fixed size, attached to at most one server." })
export class DiskType_ extends Node {
  @Field() name: string;
  @Field(() => DiskType) type: DiskType;
  @Field(() => SafeInt) sizeBytes: number;
  @Field(() => SafeInt, { description: "Bytes of the disk that hold written data." }) usedBytes: number;
  @Field(() => DiskStatus) status: DiskStatus;
  @Field(() => String, { nullable: true, description: "Device name on its server, e.g. /dev/vdb." }) device: string | null;
  @Field(() => DateTime) createdAt: Date;
  @Field(() => DateTime) updatedAt: Date;
}

@ObjectType("DiskHydration", { simpleResolvers: true, description: "Where a disk's data lives: a disk made from a backup or image (a clone) reads the blocks it has not written from the vault." })
export class DiskHydrationType {
  @Field(() => SafeInt, { description: "Data still read from the backup or image in the vault; 0 once hydrated." }) bytesInVault: number;
  @Field(() => SafeInt, { description: "Data in the disk's own storage." }) bytesLocal: number;
}

@ObjectType("Backup", { simpleResolvers: true, implements: Node, description: "The state of a server (all its disks) or of one disk at one point in time." })
export class BackupType extends Node {
  @Field() name: string;
  @Field() description: string;
  @Field(() => BackupResourceType) resourceType: BackupResourceType;
  @Field(() => String, { description: "Name of the backed-up resource when the backup was taken." }) resourceName: string;
  @Field(() => BackupStatus) status: BackupStatus;
  @Field(() => BackupTrigger) trigger: BackupTrigger;
  @Field(() => DateTime) createdAt: Date;
  @Field(() => DateTime, { nullable: true }) completedAt: Date | null;
  @Field(() => SafeInt, { description: "Data the backup represents: the written blocks of its disks." }) sizeBytes: number;
  @Field(() => SafeInt, { description: "Bytes this backup added to the vault after dedup and compression." }) storedBytes: number;
  @Field(() => Float, { description: "0 to 1." }) progress: number;
  @Field(() => String, { nullable: true }) error: string | null;
}

@ObjectType("Image", { simpleResolvers: true, implements: Node, description: "Everything needed to create a server (SYSTEM_DISK, FULL_SERVER) or a disk (DATA_DISK)." })
export class ImageType_ extends Node {
  @Field() name: string;
  @Field() description: string;
  @Field(() => ImageType) type: ImageType;
  @Field(() => ImageStatus) status: ImageStatus;
  @Field(() => ImageSource) source: ImageSource;
  @Field(() => OsType) osType: OsType;
  @Field(() => SafeInt) minDiskBytes: number;
  @Field(() => SafeInt) virtualSizeBytes: number;
  @Field(() => SafeInt, { description: "Stored (compressed) size." }) sizeBytes: number;
  @Field(() => String, {
    nullable: true,
    description:
      "The image's content checksum: SHA-256 over the index and SHA-256 of every 64 KiB block that is not all zeros, then the virtual size (`stowage checksum FILE` computes it from any image file).",
  })
  checksum: string | null;
  @Field(() => DateTime) createdAt: Date;
}

@ObjectType("ImageExport", { simpleResolvers: true, implements: Node, description: "An image written to a file of a disk-image format." })
export class ImageExportType extends Node {
  @Field(() => DiskFormat) format: DiskFormat;
  @Field(() => ExportStatus) status: ExportStatus;
  @Field(() => SafeInt, { nullable: true }) sizeBytes: number | null;
  @Field(() => String, { nullable: true, description: "SHA-256 of the file; null for RAW exports, which are sparse (verify them with the image's checksum)." }) sha256: string | null;
  @Field(() => DateTime, { nullable: true }) expiresAt: Date | null;
  @Field(() => DateTime) createdAt: Date;
}

@ObjectType("NbdExport", {
  simpleResolvers: true,
  implements: Node,
  description: "A disk served over the Network Block Device protocol. Its URI's export name is a capability: whoever has it reaches the disk, in its mode, until the export is deleted.",
})
export class NbdExportType extends Node {
  @Field({ description: "Whether clients may only read." }) readOnly: boolean;
  @Field(() => DateTime) createdAt: Date;
}

@ObjectType("Retention", { simpleResolvers: true, description: "Which policy backups are kept; a backup any rule keeps stays." })
export class RetentionType {
  @Field(() => Int, { nullable: true, description: "Keep the newest n backups of each resource." }) maxBackups: number | null;
  @Field(() => Int, { nullable: true, description: "Keep backups younger than n days." }) retentionDays: number | null;
  @Field(() => Int) keepDaily: number;
  @Field(() => Int) keepWeekly: number;
  @Field(() => Int) keepMonthly: number;
  @Field(() => Int) keepYearly: number;
}

@ObjectType("Policy", { simpleResolvers: true, implements: Node, description: "A schedule (iCalendar RRULEs in a time zone) plus retention rules, bound to servers and disks." })
export class PolicyType extends Node {
  @Field() name: string;
  @Field() enabled: boolean;
  @Field(() => [String], { description: "RFC 5545 RRULEs, e.g. FREQ=DAILY;BYHOUR=2;BYMINUTE=0." }) schedule: string[];
  @Field({ description: "IANA time zone the schedule is read in." }) timezone: string;
  @Field(() => DateTime, { nullable: true }) lastRunAt: Date | null;
  @Field(() => DateTime, { nullable: true }) nextRunAt: Date | null;
  @Field(() => DateTime) createdAt: Date;
}

@ObjectType("JobError", { simpleResolvers: true, description: "Why a job failed, and with it the image or export it made: a stable code and a message for people." })
export class JobErrorType {
  @Field() code: string;
  @Field() message: string;
}

@ObjectType("Job", { simpleResolvers: true, implements: Node, description: "One long operation with its progress." })
export class JobType_ extends Node {
  @Field(() => JobType) type: JobType;
  @Field(() => JobStatus) status: JobStatus;
  @Field(() => Float, { description: "0 to 1." }) progress: number;
  @Field(() => SafeInt) bytesDone: number;
  @Field(() => SafeInt) bytesTotal: number;
  @Field(() => DateTime) createdAt: Date;
  @Field(() => DateTime, { nullable: true }) startedAt: Date | null;
  @Field(() => DateTime, { nullable: true }) finishedAt: Date | null;
}

@ObjectType("StorageUsage", { simpleResolvers: true })
export class StorageUsageType {
  @Field(() => SafeInt, { description: "Written bytes of all disks." }) diskBytes: number;
  @Field(() => Int) backupCount: number;
  @Field(() => Int) imageCount: number;
  @Field(() => SafeInt, { description: "Written data the AVAILABLE backups and ACTIVE images represent, each counted in full: before dedup and compression." }) logicalBytes: number;
  @Field(() => SafeInt, {
    description: "Data the vault keeps for disks made from backups and images deleted since (their block lists, counted in full): it stays stored until those disks are deleted or hydrated.",
  })
  cloneSourceBytes: number;
  @Field(() => SafeInt, { description: "What the vault stores: its distinct chunks, compressed, whatever refers to them (backups, images, or nothing until garbage collection)." }) storedBytes: number;
  @Field(() => Float, { description: "logicalBytes / storedBytes (1 while the vault is empty)." }) dedupRatio: number;
  @Field(() => SafeInt, { description: "Bytes of the vault's pack files: storedBytes, plus chunks garbage collection has dropped from packs it has not rewritten yet." }) vaultBytes: number;
  @Field(() => SafeInt, { description: "Files of READY image exports, until they expire or are deleted." }) exportBytes: number;
  @Field(() => SafeInt, { description: "Uploaded files waiting to be imported, until they expire." }) uploadBytes: number;
}

@ObjectType("Project", { simpleResolvers: true, implements: Node, description: "A tenant: every resource belongs to one." })
export class ProjectType extends Node {
  @Field() name: string;
  @Field(() => DateTime) createdAt: Date;
}

export const ServerConnection = connectionOf("Server", ServerType);
export const DiskConnection = connectionOf("Disk", DiskType_);
export const BackupConnection = connectionOf("Backup", BackupType);
export const ImageConnection = connectionOf("Image", ImageType_);
export const ImageExportConnection = connectionOf("ImageExport", ImageExportType);
export const PolicyConnection = connectionOf("Policy", PolicyType);
export const JobConnection = connectionOf("Job", JobType_);
export const NbdExportConnection = connectionOf("NbdExport", NbdExportType);

@ObjectType("SkippedResource", { simpleResolvers: true, description: "A bound resource a policy run did not back up, and why." })
export class SkippedResourceType {
  @Field(() => BackupResourceType) resourceType: BackupResourceType;
  @Field() resourceId: string;
  @Field() resourceName: string;
  @Field() reason: string;
}

@ObjectType("PolicyRun", { simpleResolvers: true, description: "One run of a policy: on its schedule or asked for with runPolicy." })
export class PolicyRunType {
  @Field() trigger: string;
  @Field(() => DateTime, { description: "The occurrence it served." }) scheduledFor: Date;
  @Field(() => DateTime) startedAt: Date;
  @Field(() => Int, { description: "Backups it started." }) backupCount: number;
  @Field(() => Int, { description: "Backups its retention pass deleted." }) deletedCount: number;
  @Field(() => [SkippedResourceType]) skipped: unknown[];
}

@ObjectType("RetentionDecision", { simpleResolvers: true, description: "What the next retention pass does with one backup, and why." })
export class RetentionDecisionType {
  @Field(() => BackupType) backup: unknown;
  @Field() keep: boolean;
  @Field(() => [String], { description: "Every rule that keeps it; empty when it would be deleted." }) reasons: string[];
}

export const PolicyRunConnection = connectionOf("PolicyRun", PolicyRunType);

sourceEntity(ServerType, Server);
sourceEntity(DiskType_, Disk);
sourceEntity(BackupType, Backup);
sourceEntity(ImageType_, Image);
sourceEntity(ImageExportType, ImageExport);
sourceEntity(PolicyType, Policy);
sourceEntity(JobType_, Job);
sourceEntity(ProjectType, Project);
sourceEntity(NbdExportType, NbdExport);
