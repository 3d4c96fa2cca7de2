import { Arg, Ctx, FieldResolver, Mutation, Resolver, Root } from "type-graphql";
import type { Config } from "../../config";
import type { NbdExport } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import type { GraphQLContext } from "../context";
import { Reads } from "../selection";
import { CreateNbdExportInput, IdInput } from "../types/inputs.type";
import { Node } from "../types/node";
import { CreateNbdExportPayload, DeleteNbdExportPayload } from "../types/payloads.type";
import { NbdExportType } from "../types/resources.type";

/** The URI clients open: nbds:// when the server offers TLS (then it is required), with the capability as the export name. */
export function nbdUri(config: Config, name: string): string {
  const host = config.nbdPublicHost.includes(":") ? `[${config.nbdPublicHost}]` : config.nbdPublicHost;
  return `${config.nbdTls ? "nbds" : "nbd"}://${host}:${config.nbdPort}/${name}`;
}

@Resolver(() => NbdExportType)
export class NbdExportResolver {
  @Mutation(() => CreateNbdExportPayload, {
    description:
      "Serves a disk over NBD (qemu, qemu-img, nbdinfo, nbdcopy, the Linux kernel) under a new capability URI; its connections are consistent with each other (multi-conn). A disk backup or a SYSTEM_DISK/DATA_DISK image is served read-only, straight from the vault (a live mount, no copy).",
  })
  async createNbdExport(@Arg("input") input: CreateNbdExportInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { nbdExport: await services.nbd.create(ctx, input) };
  }

  @Mutation(() => DeleteNbdExportPayload, { description: "Revokes an export: its URI stops working and its connections are dropped (their acknowledged writes are committed first)." })
  async deleteNbdExport(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const exp = await services.nbd.delete(ctx, input.id);
    return { deletedNbdExportId: toGlobalId("NbdExport", exp.id) };
  }

  @Reads("name")
  @FieldResolver(() => String, { description: "nbd:// (or nbds:// with TLS) URI to open as it is, e.g. qemu-img info URI." })
  uri(@Root() exp: NbdExport, @Ctx() { ctx }: GraphQLContext): string {
    return nbdUri(ctx.config, exp.name);
  }

  @Reads("diskId", "backupId", "imageId")
  @FieldResolver(() => Node, { nullable: true, description: "What is served: a disk, a backup or an image. Null once it is gone." })
  resource(@Root() exp: NbdExport, @Ctx() { ctx }: GraphQLContext) {
    if (exp.backupId) return ctx.loaders.backup.load(exp.backupId);
    if (exp.imageId) return ctx.loaders.image.load(exp.imageId);
    return exp.diskId ? ctx.loaders.disk.load(exp.diskId) : null;
  }
}
