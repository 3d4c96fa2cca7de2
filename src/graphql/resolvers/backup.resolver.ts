import { Args, Ctx, FieldResolver, ID, Query, Resolver, Root } from "type-graphql";
import { BackupResourceType, type Backup } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import type { GraphQLContext } from "../context";
import { BackupListArgs, ImageListArgs } from "../types/inputs.type";
import { BackupConnection, BackupType, DiskType_, ImageConnection, JobType_, PolicyType, ServerType } from "../types/resources.type";

@Resolver(() => BackupType)
export class BackupResolver {
  @Query(() => BackupConnection)
  backups(@Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.backups.list(ctx, "backups", ctx.projectId, args);
  }

  @FieldResolver(() => ID, { description: "Global ID of the backed-up server or disk, which may no longer exist." })
  resourceId(@Root() backup: Backup) {
    return toGlobalId(backup.resourceType === BackupResourceType.SERVER ? "Server" : "Disk", backup.resourceId);
  }

  @FieldResolver(() => ServerType, { nullable: true })
  server(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.serverId ? ctx.loaders.server.load(backup.serverId) : null;
  }

  @FieldResolver(() => DiskType_, { nullable: true })
  disk(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.diskId ? ctx.loaders.disk.load(backup.diskId) : null;
  }

  @FieldResolver(() => PolicyType, { nullable: true })
  policy(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.policyId ? ctx.loaders.policy.load(backup.policyId) : null;
  }

  @FieldResolver(() => BackupType, { nullable: true, description: "The server backup this disk backup is part of." })
  parent(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.parentId ? ctx.loaders.backup.load(backup.parentId) : null;
  }

  @FieldResolver(() => BackupConnection, { description: "One disk backup per disk of a server backup." })
  children(@Root() backup: Backup, @Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.backups.list(ctx, "backupChildren", backup.id, args);
  }

  @FieldResolver(() => JobType_, { nullable: true })
  job(@Root() backup: Backup, @Ctx() { ctx }: GraphQLContext) {
    return backup.jobId ? ctx.loaders.job.load(backup.jobId) : null;
  }

  @FieldResolver(() => ImageConnection)
  images(@Root() backup: Backup, @Args() args: ImageListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.images.list(ctx, "backupImages", backup.id, args);
  }
}
