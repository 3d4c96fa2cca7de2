import { Args, Ctx, FieldResolver, Int, Query, Resolver, Root } from "type-graphql";
import type { Job } from "../../entities";
import type { GraphQLContext } from "../context";
import { JobListArgs } from "../types/inputs.type";
import { BackupType, DiskType_, ImageExportType, ImageType_, JobConnection, JobErrorType, JobType_, PolicyType, ServerType } from "../types/resources.type";

@Resolver(() => JobType_)
export class JobResolver {
  @Query(() => JobConnection)
  jobs(@Args() args: JobListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.jobs.list(ctx, args);
  }

  @FieldResolver(() => Int, { nullable: true, description: "Seconds left at the current rate, while running." })
  etaSeconds(@Root() job: Job) {
    if (job.status !== "RUNNING" || !job.startedAt || job.bytesDone <= 0 || job.bytesTotal <= job.bytesDone) return null;
    const elapsed = (Date.now() - job.startedAt.getTime()) / 1000;
    return Math.max(0, Math.round(((job.bytesTotal - job.bytesDone) * elapsed) / job.bytesDone));
  }

  @FieldResolver(() => JobErrorType, { nullable: true })
  error(@Root() job: Job) {
    return job.errorCode ? { code: job.errorCode, message: job.errorMessage ?? "" } : null;
  }

  @FieldResolver(() => ServerType, { nullable: true })
  server(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.serverId ? ctx.loaders.server.load(job.serverId) : null;
  }

  @FieldResolver(() => DiskType_, { nullable: true })
  disk(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.diskId ? ctx.loaders.disk.load(job.diskId) : null;
  }

  @FieldResolver(() => BackupType, { nullable: true })
  backup(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.backupId ? ctx.loaders.backup.load(job.backupId) : null;
  }

  @FieldResolver(() => ImageType_, { nullable: true })
  image(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.imageId ? ctx.loaders.image.load(job.imageId) : null;
  }

  @FieldResolver(() => ImageExportType, { nullable: true, name: "export" })
  exportOf(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.exportId ? ctx.loaders.imageExport.load(job.exportId) : null;
  }

  @FieldResolver(() => PolicyType, { nullable: true })
  policy(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.policyId ? ctx.loaders.policy.load(job.policyId) : null;
  }
}
