import { Arg, Args, Ctx, FieldResolver, Info, Int, Mutation, Query, Resolver, Root } from "type-graphql";
import type { GraphQLResolveInfo } from "graphql";
import { listSelection, Reads } from "../selection";
import type { Job } from "../../entities";
import { etaSeconds } from "../../services/progress";
import type { GraphQLContext } from "../context";
import { failureOf } from "../errors";
import { IdInput, JobListArgs } from "../types/inputs.type";
import { CancelJobPayload } from "../types/payloads.type";
import { BackupType, DiskType_, ImageExportType, ImageType_, JobConnection, JobErrorType, JobType_, PolicyType, ServerType } from "../types/resources.type";

@Resolver(() => JobType_)
export class JobResolver {
  @Query(() => JobConnection)
  jobs(@Args() args: JobListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.jobs.list(ctx, args, listSelection(info));
  }

  @Mutation(() => CancelJobPayload, { description: "Stops a queued or running job; what it did is undone or marked." })
  async cancelJob(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { job: await services.jobs.cancel(ctx, input.id) };
  }

  @Reads("status", "startedAt", "bytesDone", "bytesTotal")
  @FieldResolver(() => Int, { nullable: true, description: "Seconds left at the current rate, while running." })
  etaSeconds(@Root() job: Job) {
    return etaSeconds(job);
  }

  @Reads("errorCode", "errorMessage")
  @FieldResolver(() => JobErrorType, { nullable: true })
  error(@Root() job: Job) {
    return failureOf(job);
  }

  @Reads("serverId")
  @FieldResolver(() => ServerType, { nullable: true })
  server(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.serverId ? ctx.loaders.server.load(job.serverId) : null;
  }

  @Reads("diskId")
  @FieldResolver(() => DiskType_, { nullable: true })
  disk(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.diskId ? ctx.loaders.disk.load(job.diskId) : null;
  }

  @Reads("backupId")
  @FieldResolver(() => BackupType, { nullable: true })
  backup(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.backupId ? ctx.loaders.backup.load(job.backupId) : null;
  }

  @Reads("imageId")
  @FieldResolver(() => ImageType_, { nullable: true })
  image(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.imageId ? ctx.loaders.image.load(job.imageId) : null;
  }

  @Reads("exportId")
  @FieldResolver(() => ImageExportType, { nullable: true, name: "export" })
  exportOf(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.exportId ? ctx.loaders.imageExport.load(job.exportId) : null;
  }

  @Reads("policyId")
  @FieldResolver(() => PolicyType, { nullable: true })
  policy(@Root() job: Job, @Ctx() { ctx }: GraphQLContext) {
    return job.policyId ? ctx.loaders.policy.load(job.policyId) : null;
  }
}
