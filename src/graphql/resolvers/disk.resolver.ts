import { Arg, Args, Ctx, FieldResolver, Info, Mutation, Query, Resolver, Root } from "type-graphql";
import type { GraphQLResolveInfo } from "graphql";
import { listSelection, Reads } from "../selection";
import type { Disk } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import type { GraphQLContext } from "../context";
import { AttachDiskInput, BackupListArgs, CreateDiskInput, DetachDiskInput, DiskListArgs, IdInput, ImageListArgs, PolicyListArgs } from "../types/inputs.type";
import { AttachmentPayload, DeleteDiskPayload, DiskPayload } from "../types/payloads.type";
import { BackupConnection, BackupType, DiskConnection, DiskHydrationType, DiskType_, ImageConnection, ImageType_, NbdExportConnection, PolicyConnection, ServerType } from "../types/resources.type";
import { PageArgs } from "../types/connection";

@Resolver(() => DiskType_)
export class DiskResolver {
  @Query(() => DiskConnection)
  disks(@Args() args: DiskListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.disks.list(ctx, "disks", ctx.projectId, args, listSelection(info));
  }

  @Mutation(() => DiskPayload, { description: "Creates a blank data disk, or one filled from an image or a backup." })
  createDisk(@Arg("input") input: CreateDiskInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.disks.create(ctx, input);
  }

  @Mutation(() => DiskPayload, { description: "Copies the blocks a disk made from a backup or image still reads from the vault into its own storage, as a job; the disk stays in use." })
  hydrateDisk(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.disks.hydrate(ctx, input.id);
  }

  @Mutation(() => AttachmentPayload)
  attachDisk(@Arg("input") input: AttachDiskInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.disks.attach(ctx, input);
  }

  @Mutation(() => AttachmentPayload)
  detachDisk(@Arg("input") input: DetachDiskInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.disks.detach(ctx, input);
  }

  @Mutation(() => DeleteDiskPayload, { description: "Deletes a detached disk; its backups stay." })
  async deleteDisk(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const disk = await services.disks.delete(ctx, input.id);
    return { deletedDiskId: toGlobalId("Disk", disk.id) };
  }

  @Reads("serverId")
  @FieldResolver(() => ServerType, { nullable: true })
  server(@Root() disk: Disk, @Ctx() { ctx }: GraphQLContext) {
    return disk.serverId ? ctx.loaders.server.load(disk.serverId) : null;
  }

  @Reads("sourceImageId")
  @FieldResolver(() => ImageType_, { nullable: true })
  sourceImage(@Root() disk: Disk, @Ctx() { ctx }: GraphQLContext) {
    return disk.sourceImageId ? ctx.loaders.image.load(disk.sourceImageId) : null;
  }

  @Reads("sourceBackupId")
  @FieldResolver(() => BackupType, { nullable: true })
  sourceBackup(@Root() disk: Disk, @Ctx() { ctx }: GraphQLContext) {
    return disk.sourceBackupId ? ctx.loaders.backup.load(disk.sourceBackupId) : null;
  }

  @Reads()
  @FieldResolver(() => BackupConnection, { description: "Backups of this disk, its parts of server backups included." })
  backups(@Root() disk: Disk, @Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.backups.list(ctx, "diskBackups", disk.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => ImageConnection)
  images(@Root() disk: Disk, @Args() args: ImageListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.images.list(ctx, "diskImages", disk.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => PolicyConnection)
  policies(@Root() disk: Disk, @Args() args: PolicyListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.policies.list(ctx, "diskPolicies", disk.id, args, listSelection(info));
  }

  @Reads("id")
  @FieldResolver(() => DiskHydrationType, { description: "How much of its data is still read from the vault (a disk made from a backup or image) and how much is its own." })
  hydration(@Root() disk: Disk, @Ctx() { ctx, services }: GraphQLContext) {
    return services.disks.hydration(ctx, disk.id);
  }

  @Reads()
  @FieldResolver(() => NbdExportConnection, { description: "Its exports over NBD, oldest first." })
  nbdExports(@Root() disk: Disk, @Args() args: PageArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.nbd.list(ctx, disk.id, args, listSelection(info));
  }
}
