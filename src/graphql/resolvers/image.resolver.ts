import { Args, Ctx, FieldResolver, Query, Resolver, Root } from "type-graphql";
import type { Image, ImageExport } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import { isExportable } from "../../services/image.service";
import type { GraphQLContext } from "../context";
import { DiskListArgs, ImageExportListArgs, ImageListArgs, ServerListArgs } from "../types/inputs.type";
import { BackupType, DiskConnection, DiskType_, ImageConnection, ImageExportConnection, ImageExportType, ImageType_, JobType_, ServerConnection, ServerType } from "../types/resources.type";

@Resolver(() => ImageType_)
export class ImageResolver {
  @Query(() => ImageConnection)
  images(@Args() args: ImageListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.images.list(ctx, "images", ctx.projectId, args);
  }

  @FieldResolver(() => Boolean, { description: "FULL_SERVER images cannot be exported to a file." })
  exportable(@Root() image: Image) {
    return isExportable(image);
  }

  @FieldResolver(() => ServerType, { nullable: true })
  sourceServer(@Root() image: Image, @Ctx() { ctx }: GraphQLContext) {
    return image.sourceServerId ? ctx.loaders.server.load(image.sourceServerId) : null;
  }

  @FieldResolver(() => DiskType_, { nullable: true })
  sourceDisk(@Root() image: Image, @Ctx() { ctx }: GraphQLContext) {
    return image.sourceDiskId ? ctx.loaders.disk.load(image.sourceDiskId) : null;
  }

  @FieldResolver(() => BackupType, { nullable: true })
  sourceBackup(@Root() image: Image, @Ctx() { ctx }: GraphQLContext) {
    return image.sourceBackupId ? ctx.loaders.backup.load(image.sourceBackupId) : null;
  }

  @FieldResolver(() => ImageExportConnection)
  exports(@Root() image: Image, @Args() args: ImageExportListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.images.exports(ctx, image.id, args);
  }

  @FieldResolver(() => ServerConnection, { description: "Servers created from this image." })
  servers(@Root() image: Image, @Args() args: ServerListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.servers.list(ctx, "imageServers", image.id, args);
  }

  @FieldResolver(() => DiskConnection, { description: "Disks created from this image." })
  disks(@Root() image: Image, @Args() args: DiskListArgs, @Ctx() { ctx, services }: GraphQLContext) {
    return services.disks.list(ctx, "imageDisks", image.id, args);
  }
}

@Resolver(() => ImageExportType)
export class ImageExportResolver {
  @FieldResolver(() => ImageType_)
  image(@Root() exp: ImageExport, @Ctx() { ctx }: GraphQLContext) {
    return ctx.loaders.image.load(exp.imageId);
  }

  @FieldResolver(() => String, { nullable: true, description: "Where the file can be downloaded once READY (same Authorization header)." })
  downloadUrl(@Root() exp: ImageExport) {
    return exp.status === "READY" ? `/v1/exports/${toGlobalId("ImageExport", exp.id)}/file` : null;
  }

  @FieldResolver(() => JobType_, { nullable: true })
  job(@Root() exp: ImageExport, @Ctx() { ctx }: GraphQLContext) {
    return exp.jobId ? ctx.loaders.job.load(exp.jobId) : null;
  }
}
