import { Field, ID, ObjectType } from "type-graphql";
import { BackupType, DiskType_, ImageExportType, ImageType_, JobType_, NbdExportType, PolicyRunType, PolicyType, ServerType } from "./resources.type";

@ObjectType()
export class CreateServerPayload {
  @Field(() => ServerType) server: unknown;
  @Field(() => JobType_, { nullable: true, description: "The job writing images onto the new disks; null for blank disks." }) job: unknown;
}

@ObjectType()
export class ServerPayload {
  @Field(() => ServerType) server: unknown;
}

@ObjectType()
export class DeleteServerPayload {
  @Field(() => ID) deletedServerId: string;
  @Field(() => [ID]) deletedDiskIds: string[];
  @Field(() => [ID], { description: "Data disks that were detached and kept." }) detachedDiskIds: string[];
}

@ObjectType()
export class DiskPayload {
  @Field(() => DiskType_) disk: unknown;
  @Field(() => JobType_, { nullable: true, description: "The job copying a disk made from a backup or image into its own storage (hydrate); null otherwise: the disk is usable at once." })
  job: unknown;
}

@ObjectType()
export class AttachmentPayload {
  @Field(() => DiskType_) disk: unknown;
  @Field(() => ServerType) server: unknown;
}

@ObjectType()
export class DeleteDiskPayload {
  @Field(() => ID) deletedDiskId: string;
}

@ObjectType()
export class PolicyPayload {
  @Field(() => PolicyType) policy: unknown;
}

@ObjectType()
export class DeletePolicyPayload {
  @Field(() => ID) deletedPolicyId: string;
}

@ObjectType()
export class BackupPayload {
  @Field(() => BackupType) backup: unknown;
  @Field(() => JobType_) job: unknown;
}

@ObjectType()
export class CreateBackupPayload extends BackupPayload {}

@ObjectType()
export class RestoreBackupPayload extends BackupPayload {}

@ObjectType()
export class VerifyBackupPayload extends BackupPayload {}

@ObjectType()
export class DeleteBackupPayload {
  @Field(() => ID) deletedBackupId: string;
  @Field(() => JobType_, { description: "Deletes the backup and reclaims its space." }) job: unknown;
}

@ObjectType()
export class CancelJobPayload {
  @Field(() => JobType_) job: unknown;
}

@ObjectType()
export class ImagePayload {
  @Field(() => ImageType_) image: unknown;
  @Field(() => JobType_) job: unknown;
}

@ObjectType()
export class CreateImagePayload extends ImagePayload {}

@ObjectType()
export class ImportImagePayload extends ImagePayload {}

@ObjectType()
export class ExportImagePayload {
  @Field(() => ImageExportType) export: unknown;
  @Field(() => JobType_) job: unknown;
}

@ObjectType()
export class DeleteImagePayload {
  @Field(() => ID) deletedImageId: string;
}

@ObjectType()
export class CreateNbdExportPayload {
  @Field(() => NbdExportType) nbdExport: unknown;
}

@ObjectType()
export class DeleteNbdExportPayload {
  @Field(() => ID) deletedNbdExportId: string;
}

@ObjectType()
export class DeleteImageExportPayload {
  @Field(() => ID) deletedImageExportId: string;
}

@ObjectType()
export class RunPolicyPayload {
  @Field(() => PolicyRunType) run: unknown;
  @Field(() => PolicyType) policy: unknown;
}
