import { ArgsType, Field, ID, InputType, Int } from "type-graphql";
import { Order, PageArgs, TimeOrder } from "./connection";
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
import { SafeInt } from "./scalars";

const nameFilter = { nullable: true, description: "Case-insensitive substring of the name." } as const;

@InputType()
export class ServerFilter {
  @Field(() => [ServerStatus], { nullable: true }) statuses?: ServerStatus[];
  @Field(() => [OsType], { nullable: true }) osTypes?: OsType[];
  @Field(() => String, nameFilter) name?: string;
  @Field(() => ID, { nullable: true, description: "Servers created from this image." }) imageId?: string;
}

@InputType()
export class DiskFilter {
  @Field(() => [DiskStatus], { nullable: true }) statuses?: DiskStatus[];
  @Field(() => [DiskType], { nullable: true }) types?: DiskType[];
  @Field(() => String, nameFilter) name?: string;
  @Field(() => ID, { nullable: true }) serverId?: string;
  @Field(() => Boolean, { nullable: true }) attached?: boolean;
  @Field(() => ID, { nullable: true }) imageId?: string;
  @Field(() => ID, { nullable: true }) backupId?: string;
}

@InputType()
export class BackupFilter {
  @Field(() => [BackupStatus], { nullable: true }) statuses?: BackupStatus[];
  @Field(() => [BackupResourceType], { nullable: true }) resourceTypes?: BackupResourceType[];
  @Field(() => [BackupTrigger], { nullable: true }) triggers?: BackupTrigger[];
  @Field(() => String, nameFilter) name?: string;
  @Field(() => ID, { nullable: true, description: "Backups of this server or disk." }) resourceId?: string;
  @Field(() => ID, { nullable: true }) policyId?: string;
  @Field(() => Boolean, { nullable: true, description: "true: only backups that are not part of a server backup." }) topLevel?: boolean;
}

@InputType()
export class ImageFilter {
  @Field(() => [ImageStatus], { nullable: true }) statuses?: ImageStatus[];
  @Field(() => [ImageType], { nullable: true }) types?: ImageType[];
  @Field(() => [ImageSource], { nullable: true }) sources?: ImageSource[];
  @Field(() => [OsType], { nullable: true }) osTypes?: OsType[];
  @Field(() => String, nameFilter) name?: string;
}

@InputType()
export class ImageExportFilter {
  @Field(() => [ExportStatus], { nullable: true }) statuses?: ExportStatus[];
  @Field(() => [DiskFormat], { nullable: true }) formats?: DiskFormat[];
}

@InputType()
export class PolicyFilter {
  @Field(() => Boolean, { nullable: true }) enabled?: boolean;
  @Field(() => String, nameFilter) name?: string;
}

@InputType()
export class JobFilter {
  @Field(() => [JobStatus], { nullable: true }) statuses?: JobStatus[];
  @Field(() => [JobType], { nullable: true }) types?: JobType[];
  @Field(() => ID, { nullable: true, description: "Jobs acting on this server, disk, backup, image, export or policy." }) resourceId?: string;
}

@ArgsType()
export class ServerListArgs extends PageArgs {
  @Field(() => ServerFilter, { nullable: true }) filter?: ServerFilter;
  @Field(() => Order, { nullable: true }) orderBy?: Order;
}
@ArgsType()
export class DiskListArgs extends PageArgs {
  @Field(() => DiskFilter, { nullable: true }) filter?: DiskFilter;
  @Field(() => Order, { nullable: true }) orderBy?: Order;
}
@ArgsType()
export class BackupListArgs extends PageArgs {
  @Field(() => BackupFilter, { nullable: true }) filter?: BackupFilter;
  @Field(() => Order, { nullable: true }) orderBy?: Order;
}
@ArgsType()
export class ImageListArgs extends PageArgs {
  @Field(() => ImageFilter, { nullable: true }) filter?: ImageFilter;
  @Field(() => Order, { nullable: true }) orderBy?: Order;
}
@ArgsType()
export class ImageExportListArgs extends PageArgs {
  @Field(() => ImageExportFilter, { nullable: true }) filter?: ImageExportFilter;
  @Field(() => TimeOrder, { nullable: true }) orderBy?: TimeOrder;
}
@ArgsType()
export class PolicyListArgs extends PageArgs {
  @Field(() => PolicyFilter, { nullable: true }) filter?: PolicyFilter;
  @Field(() => Order, { nullable: true }) orderBy?: Order;
}
@ArgsType()
export class JobListArgs extends PageArgs {
  @Field(() => JobFilter, { nullable: true }) filter?: JobFilter;
  @Field(() => TimeOrder, { nullable: true }) orderBy?: TimeOrder;
}

@InputType()
export class CreateNbdExportInput {
  @Field(() => ID, { description: "What to serve: a disk, a disk backup, or a SYSTEM_DISK or DATA_DISK image (backups and images read straight from the vault, no copy)." })
  resourceId: string;
  @Field(() => Boolean, { nullable: true, description: "Serve it read-only. A disk is served read-write unless this is true; backups and images are always read-only." })
  readOnly?: boolean | null;
}

@InputType()
export class IdInput {
  @Field(() => ID) id: string;
}

@InputType()
export class DataDiskInput {
  @Field(() => String, { nullable: true, description: "Defaults to <server>-data-<n>." }) name?: string;
  @Field(() => SafeInt, { nullable: true, description: "Required for a blank disk; from an image, at least its minimum (the default)." }) sizeBytes?: number;
  @Field(() => ID, { nullable: true, description: "A DATA_DISK image to fill the disk from." }) imageId?: string;
}

@InputType()
export class CreateServerInput {
  @Field() name: string;
  @Field(() => Int) vcpus: number;
  @Field(() => Int) memoryMiB: number;
  @Field(() => OsType, { nullable: true, description: "Defaults to the image's, or LINUX." }) osType?: OsType;
  @Field(() => ID, { nullable: true, description: "A SYSTEM_DISK or FULL_SERVER image." }) imageId?: string;
  @Field(() => SafeInt, { nullable: true, description: "Required without imageId; a whole number of MiB." }) systemDiskSizeBytes?: number;
  @Field(() => [DataDiskInput], { nullable: true }) dataDisks?: DataDiskInput[];
  @Field(() => Boolean, { nullable: true, description: "Copy the blocks of disks made from images into their own storage in the background, as a job, while the server runs." })
  hydrate?: boolean;
}

@InputType()
export class DeleteServerInput {
  @Field(() => ID) id: string;
  @Field({ defaultValue: false, description: "Delete the data disks too; otherwise they are detached and kept. The system disk is always deleted." })
  deleteDisks: boolean;
}

@InputType()
export class CreateDiskInput {
  @Field() name: string;
  @Field(() => SafeInt, { nullable: true, description: "Required for a blank disk; a whole number of MiB." }) sizeBytes?: number;
  @Field(() => ID, { nullable: true, description: "A DATA_DISK image: the disk reads as it at once (a clone), its blocks coming from the vault until written." }) imageId?: string;
  @Field(() => ID, { nullable: true, description: "A disk backup: the disk reads as it at once (a clone), its blocks coming from the vault until written." }) backupId?: string;
  @Field(() => Boolean, { nullable: true, description: "With imageId or backupId: copy the blocks into the disk's own storage in the background, as a job, while it is in use." })
  hydrate?: boolean;
}

@InputType()
export class AttachDiskInput {
  @Field(() => ID) diskId: string;
  @Field(() => ID) serverId: string;
  @Field(() => String, { nullable: true, description: "/dev/vdb to /dev/vdz; the first free one when omitted." }) device?: string;
}

@InputType()
export class DetachDiskInput {
  @Field(() => ID) diskId: string;
  @Field(() => ID, { nullable: true, description: "When given, the disk must be attached to this server." }) serverId?: string;
}

@InputType()
export class RetentionInput {
  @Field(() => Int, { nullable: true, description: "1 to 99999." }) maxBackups?: number | null;
  @Field(() => Int, { nullable: true, description: "1 to 99999." }) retentionDays?: number | null;
  @Field(() => Int, { nullable: true, description: "0 to 100." }) keepDaily?: number | null;
  @Field(() => Int, { nullable: true, description: "0 to 100." }) keepWeekly?: number | null;
  @Field(() => Int, { nullable: true, description: "0 to 100." }) keepMonthly?: number | null;
  @Field(() => Int, { nullable: true, description: "0 to 100." }) keepYearly?: number | null;
}

@InputType()
export class CreatePolicyInput {
  @Field() name: string;
  @Field(() => Boolean, { nullable: true, defaultValue: true }) enabled?: boolean;
  @Field(() => [String], { description: "RFC 5545 RRULEs, e.g. FREQ=DAILY;BYHOUR=2;BYMINUTE=0." }) schedule: string[];
  @Field(() => String, { nullable: true, defaultValue: "UTC", description: "IANA time zone." }) timezone?: string;
  @Field(() => RetentionInput, { nullable: true }) retention?: RetentionInput;
}

@InputType()
export class UpdatePolicyInput {
  @Field(() => ID) id: string;
  @Field(() => String, { nullable: true }) name?: string;
  @Field(() => Boolean, { nullable: true }) enabled?: boolean;
  @Field(() => [String], { nullable: true }) schedule?: string[];
  @Field(() => String, { nullable: true }) timezone?: string;
  @Field(() => RetentionInput, { nullable: true, description: "Only the fields given change; null clears a rule." }) retention?: RetentionInput;
}

@InputType()
export class BindPolicyInput {
  @Field(() => ID) policyId: string;
  @Field(() => [ID], { description: "Servers and disks." }) resourceIds: string[];
}

@InputType()
export class CreateBackupInput {
  @Field(() => ID, { description: "A server (all its disks at one instant) or a disk." }) resourceId: string;
  @Field(() => String, { nullable: true, description: "Defaults to manualbk_<short id>." }) name?: string;
  @Field(() => String, { nullable: true }) description?: string;
}

@InputType()
export class RestoreMappingInput {
  @Field(() => ID, { description: "A disk backup of the server backup." }) backupId: string;
  @Field(() => ID, { description: "The disk to restore it onto." }) diskId: string;
}

@InputType()
export class RestoreBackupInput {
  @Field(() => ID) backupId: string;
  @Field(() => ID, { nullable: true, description: "Disk backups: restore onto this disk instead of the original (at least as large)." }) targetDiskId?: string;
  @Field(() => [RestoreMappingInput], { nullable: true, description: "Server backups: which disk each disk backup goes to; by default each to its original disk." })
  mappings?: RestoreMappingInput[];
  @Field(() => Boolean, { nullable: true, defaultValue: true, description: "Start the server after the restore." }) powerOn?: boolean;
  @Field(() => Boolean, {
    nullable: true,
    description:
      "The disks read as the backup as soon as the call returns, their blocks coming from the vault until written; with hydrate, the job copies those blocks into the disks' own storage in the background while they are in use.",
  })
  hydrate?: boolean;
}

@InputType()
export class CreateImageInput {
  @Field() name: string;
  @Field(() => ImageType, { nullable: true, description: "With serverId: SYSTEM_DISK (default) or FULL_SERVER (backs the server up first). Otherwise inferred." })
  type?: ImageType;
  @Field(() => ID, { nullable: true }) serverId?: string;
  @Field(() => ID, { nullable: true }) diskId?: string;
  @Field(() => ID, { nullable: true, description: "A server backup makes a FULL_SERVER image; a disk backup a SYSTEM_DISK or DATA_DISK image." }) backupId?: string;
  @Field(() => String, { nullable: true }) description?: string;
  @Field(() => OsType, { nullable: true, description: "Defaults to the server's." }) osType?: OsType;
}

@InputType()
export class ImportImageInput {
  @Field() name: string;
  @Field(() => ImageType, { nullable: true, defaultValue: ImageType.SYSTEM_DISK, description: "SYSTEM_DISK or DATA_DISK." }) type?: ImageType;
  @Field({ description: "The id POST /v1/uploads answered." }) uploadId: string;
  @Field(() => DiskFormat, { nullable: true, description: "Detected from the file; when given, it must agree." }) format?: DiskFormat;
  @Field(() => OsType, { nullable: true }) osType?: OsType;
  @Field(() => SafeInt, { nullable: true, description: "Smallest disk the image may be written to; at least its virtual size." }) minDiskBytes?: number;
  @Field(() => String, { nullable: true }) description?: string;
}

@InputType()
export class ExportImageInput {
  @Field(() => ID) imageId: string;
  @Field(() => DiskFormat) format: DiskFormat;
}
