import { Arg, Args, Ctx, FieldResolver, Info, Mutation, Query, Resolver, Root } from "type-graphql";
import type { GraphQLResolveInfo } from "graphql";
import { listSelection, Reads } from "../selection";
import type { Image, ImageExport } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import { isExportable } from "../../services/image.service";
import type { GraphQLContext } from "../context";
import { failureOf } from "../errors";
import { CreateImageInput, DiskListArgs, ExportImageInput, IdInput, ImageExportListArgs, ImageListArgs, ImportImageInput, ServerListArgs } from "../types/inputs.type";
import { CreateImagePayload, DeleteImageExportPayload, DeleteImagePayload, ExportImagePayload, ImportImagePayload } from "../types/payloads.type";
import {
  BackupType,
  DiskConnection,
  DiskType_,
  ImageConnection,
  ImageExportConnection,
  ImageExportType,
  ImageType_,
  JobErrorType,
  JobType_,
  ServerConnection,
  ServerType,
} from "../types/resources.type";

@Resolver(() => ImageType_)
export class ImageResolver {
  @Query(() => ImageConnection)
  images(@Args() args: ImageListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.images.list(ctx, "images", ctx.projectId, args, listSelection(info));
  }

  @Mutation(() => CreateImagePayload, { description: "An image of a server's system disk, of a disk, of a backup, or (type FULL_SERVER) of a whole server." })
  createImage(@Arg("input") input: CreateImageInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.images.create(ctx, input);
  }

  @Mutation(() => ImportImagePayload, { description: "Imports a file uploaded with POST /v1/uploads (RAW, QCOW2, VMDK or VHD, detected from the file)." })
  importImage(@Arg("input") input: ImportImageInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.images.import(ctx, input);
  }

  @Mutation(() => ExportImagePayload, { description: "Writes the image to a file; download it from the export's downloadUrl when READY." })
  exportImage(@Arg("input") input: ExportImageInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.images.export(ctx, input);
  }

  @Mutation(() => DeleteImagePayload, { description: "Deletes the image and its exported files; servers and disks made from it stay." })
  async deleteImage(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const image = await services.images.delete(ctx, input.id);
    return { deletedImageId: toGlobalId("Image", image.id) };
  }

  @Mutation(() => DeleteImageExportPayload, { description: "Deletes an export and its file now, before it expires; one still being written is CONFLICT (cancel its job first)." })
  async deleteImageExport(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const exp = await services.images.deleteExport(ctx, input.id);
    return { deletedImageExportId: toGlobalId("ImageExport", exp.id) };
  }

  @Reads("errorCode", "errorMessage")
  @FieldResolver(() => JobErrorType, { nullable: true, description: "Why the image was KILLED." })
  error(@Root() image: Image) {
    return failureOf(image);
  }

  @FieldResolver(() => Boolean, { description: "FULL_SERVER images cannot be exported to a file." })
  exportable(@Root() image: Image) {
    return isExportable(image);
  }

  @Reads("sourceServerId")
  @FieldResolver(() => ServerType, { nullable: true })
  sourceServer(@Root() image: Image, @Ctx() { ctx }: GraphQLContext) {
    return image.sourceServerId ? ctx.loaders.server.load(image.sourceServerId) : null;
  }

  @Reads("sourceDiskId")
  @FieldResolver(() => DiskType_, { nullable: true })
  sourceDisk(@Root() image: Image, @Ctx() { ctx }: GraphQLContext) {
    return image.sourceDiskId ? ctx.loaders.disk.load(image.sourceDiskId) : null;
  }

  @Reads("sourceBackupId")
  @FieldResolver(() => BackupType, { nullable: true })
  sourceBackup(@Root() image: Image, @Ctx() { ctx }: GraphQLContext) {
    return image.sourceBackupId ? ctx.loaders.backup.load(image.sourceBackupId) : null;
  }

  @Reads()
  @FieldResolver(() => ImageExportConnection)
  exports(@Root() image: Image, @Args() args: ImageExportListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.images.exports(ctx, image.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => ServerConnection, { description: "Servers created from this image." })
  servers(@Root() image: Image, @Args() args: ServerListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.servers.list(ctx, "imageServers", image.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => DiskConnection, { description: "Disks created from this image." })
  disks(@Root() image: Image, @Args() args: DiskListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.disks.list(ctx, "imageDisks", image.id, args, listSelection(info));
  }
}

@Resolver(() => ImageExportType)
export class ImageExportResolver {
  @Reads("imageId")
  @FieldResolver(() => ImageType_)
  image(@Root() exp: ImageExport, @Ctx() { ctx }: GraphQLContext) {
    return ctx.loaders.image.load(exp.imageId);
  }

  @Reads("status")
  @FieldResolver(() => String, { nullable: true, description: "Where the file can be downloaded once READY (same Authorization header)." })
  downloadUrl(@Root() exp: ImageExport) {
    return exp.status === "READY" ? `/v1/exports/${toGlobalId("ImageExport", exp.id)}/file` : null;
  }

  @Reads("jobId")
  @FieldResolver(() => JobType_, { nullable: true })
  job(@Root() exp: ImageExport, @Ctx() { ctx }: GraphQLContext) {
    return exp.jobId ? ctx.loaders.job.load(exp.jobId) : null;
  }

  @Reads("errorCode", "errorMessage")
  @FieldResolver(() => JobErrorType, { nullable: true, description: "Why the export FAILED." })
  error(@Root() exp: ImageExport) {
    return failureOf(exp);
  }
}
