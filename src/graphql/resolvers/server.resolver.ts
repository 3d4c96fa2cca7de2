import { Arg, Args, Ctx, FieldResolver, Info, Int, Mutation, Query, Resolver, Root } from "type-graphql";
import type { GraphQLResolveInfo } from "graphql";
import { listSelection, Reads } from "../selection";
import type { Server } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import type { GraphQLContext } from "../context";
import { BackupListArgs, CreateServerInput, DeleteServerInput, DiskListArgs, IdInput, ImageListArgs, PolicyListArgs, ServerListArgs } from "../types/inputs.type";
import { CreateServerPayload, DeleteServerPayload, ServerPayload } from "../types/payloads.type";
import { BackupConnection, DiskConnection, DiskType_, ImageConnection, ImageType_, PolicyConnection, ServerConnection, ServerType } from "../types/resources.type";

@Resolver(() => ServerType)
export class ServerResolver {
  @Query(() => ServerConnection)
  servers(@Args() args: ServerListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.servers.list(ctx, "servers", ctx.projectId, args, listSelection(info));
  }

  @Mutation(() => CreateServerPayload, { description: "Creates a server with a system disk (/dev/vda) and data disks (/dev/vdb, …), blank or from images." })
  createServer(@Arg("input") input: CreateServerInput, @Ctx() { ctx, services }: GraphQLContext) {
    return services.servers.create(ctx, input);
  }

  @Mutation(() => ServerPayload)
  async startServer(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { server: await services.servers.start(ctx, input.id) };
  }

  @Mutation(() => ServerPayload)
  async stopServer(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { server: await services.servers.stop(ctx, input.id) };
  }

  @Mutation(() => DeleteServerPayload)
  async deleteServer(@Arg("input") input: DeleteServerInput, @Ctx() { ctx, services }: GraphQLContext) {
    const r = await services.servers.delete(ctx, input.id, input.deleteDisks);
    return {
      deletedServerId: toGlobalId("Server", r.server.id),
      deletedDiskIds: r.deletedDiskIds.map((id) => toGlobalId("Disk", id)),
      detachedDiskIds: r.detachedDiskIds.map((id) => toGlobalId("Disk", id)),
    };
  }

  @Reads("memoryMib")
  @FieldResolver(() => Int)
  memoryMiB(@Root() server: Server) {
    return server.memoryMib;
  }

  @Reads()
  @FieldResolver(() => DiskType_, { nullable: true })
  systemDisk(@Root() server: Server, @Ctx() { ctx }: GraphQLContext) {
    return ctx.loaders.systemDisk.load(server.id);
  }

  @Reads()
  @FieldResolver(() => DiskConnection, { description: "Every attached disk, the system disk included." })
  disks(@Root() server: Server, @Args() args: DiskListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.disks.list(ctx, "serverDisks", server.id, args, listSelection(info));
  }

  @Reads("sourceImageId")
  @FieldResolver(() => ImageType_, { nullable: true })
  sourceImage(@Root() server: Server, @Ctx() { ctx }: GraphQLContext) {
    return server.sourceImageId ? ctx.loaders.image.load(server.sourceImageId) : null;
  }

  @Reads()
  @FieldResolver(() => BackupConnection, { description: "Backups of this server (each holds one child per disk)." })
  backups(@Root() server: Server, @Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.backups.list(ctx, "serverBackups", server.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => ImageConnection, { description: "Images made from this server." })
  images(@Root() server: Server, @Args() args: ImageListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.images.list(ctx, "serverImages", server.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => PolicyConnection, { description: "The backup policy bound to this server (at most one)." })
  policies(@Root() server: Server, @Args() args: PolicyListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.policies.list(ctx, "serverPolicies", server.id, args, listSelection(info));
  }
}
