import { Arg, Args, Ctx, FieldResolver, ID, Info, Mutation, Query, Resolver, Root } from "type-graphql";
import type { GraphQLResolveInfo } from "graphql";
import { listSelection, Reads } from "../selection";
import { BackupResourceType, type Backup } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import { expiresAt } from "../../services/retention";
import type { GraphQLContext } from "../context";
import { BackupListArgs, CreateBackupInput, IdInput, ImageListArgs, RestoreBackupInput } from "../types/inputs.type";
import { CreateBackupPayload, DeleteBackupPayload, RestoreBackupPayload, VerifyBackupPayload } from "../types/payloads.type";
import { BackupConnection, BackupType, DiskType_, ImageConnection, JobType_, PolicyType, ServerType } from "../types/resources.type";

@Resolver(() => BackupType)
export class BackupResolver {
  @Query(() => BackupConnection)
  backups(@Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.backups.list(ctx, "backups", ctx.projectId, args, listSelection(info));
  }

  @Mutation(() => CreateBackupPayload, { description: "Backs a server (all its disks at one instant) or a disk up now." })
  createBackup(@Arg("input") input: CreateBackupInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.backups.create(ctx, input);
  }

  @Mutation(() => RestoreBackupPayload, { description: "Restores a backup onto its disks, another disk, or (server backups) the disks given in mappings." })
  restoreBackup(@Arg("input") input: RestoreBackupInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.backups.restore(ctx, input);
  }

  @Mutation(() => DeleteBackupPayload, { description: "Deletes a backup; every other backup still restores on its own." })
  async deleteBackup(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const { backup, job } = await services.backups.delete(ctx, input.id);
    return { deletedBackupId: toGlobalId("Backup", backup.id), job };
  }

  @Mutation(() => VerifyBackupPayload, { description: "Re-reads and re-hashes every chunk of the backup." })
  verifyBackup(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.backups.verify(ctx, input.id);
  }

  @Reads("resourceType", "resourceId")
  @FieldResolver(() => ID, { description: "Global ID of the backed-up server or disk, which may no longer exist." })
  resourceId(@Root() backup: Backup) {
    return toGlobalId(backup.resourceType === BackupResourceType.SERVER ? "Server" : "Disk", backup.resourceId);
  }

  @Reads("serverId")
  @FieldResolver(() => ServerType, { nullable: true })
  server(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.serverId ? ctx.loaders.server.load(backup.serverId) : null;
  }

  @Reads("diskId")
  @FieldResolver(() => DiskType_, { nullable: true })
  disk(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.diskId ? ctx.loaders.disk.load(backup.diskId) : null;
  }

  @Reads("trigger", "policyId", "parentId", "createdAt")
  @FieldResolver(() => Date, { nullable: true, description: "When the policy's retentionDays rule will delete this backup." })
  async expiresAt(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    if (backup.trigger !== "POLICY" || !backup.policyId || backup.parentId) return null;
    const policy = await ctx.loaders.policy.load(backup.policyId);
    return policy ? expiresAt(backup.createdAt, policy.retentionDays) : null;
  }

  @Reads("policyId")
  @FieldResolver(() => PolicyType, { nullable: true })
  policy(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.policyId ? ctx.loaders.policy.load(backup.policyId) : null;
  }

  @Reads("parentId")
  @FieldResolver(() => BackupType, { nullable: true, description: "The server backup this disk backup is part of." })
  parent(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.parentId ? ctx.loaders.backup.load(backup.parentId) : null;
  }

  @Reads()
  @FieldResolver(() => BackupConnection, { description: "One disk backup per disk of a server backup." })
  children(@Root() backup: Backup, @Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.backups.list(ctx, "backupChildren", backup.id, args, listSelection(info));
  }

  @Reads("jobId")
  @FieldResolver(() => JobType_, { nullable: true })
  job(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.jobId ? ctx.loaders.job.load(backup.jobId) : null;
  }

  @Reads()
  @FieldResolver(() => ImageConnection)
  images(@Root() backup: Backup, @Args() args: ImageListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.images.list(ctx, "backupImages", backup.id, args, listSelection(info));
  }
}
