import { Arg, Ctx, FieldResolver, ID, Query, Resolver, Root } from "type-graphql";
import { badInput } from "../../domain/errors";
import { fromGlobalId } from "../../services/global-id";
import type { GraphQLContext } from "../context";
import { Node } from "../types/node";
import { ProjectType, StorageUsageType } from "../types/resources.type";

const MAX_NODES = 100;

@Resolver(() => ProjectType)
export class NodeResolver {
  @Query(() => Node, { nullable: true, description: "Any object by its global ID; null when it does not exist in your project." })
  node(@Arg("id", () => ID) id: string, @Ctx() gql: GraphQLContext) {
    return this.load(id, gql);
  }

  @Query(() => [Node], { nullable: "items", description: `Objects by global ID, in the order asked (at most ${MAX_NODES}).` })
  nodes(@Arg("ids", () => [ID]) ids: string[], @Ctx() gql: GraphQLContext) {
    if (ids.length > MAX_NODES) throw badInput("ids", `at most ${MAX_NODES} IDs at once`);
    return Promise.all(ids.map((id) => this.load(id, gql)));
  }

  @Query(() => ProjectType, { description: "The project of the API key in use." })
  viewer(@Ctx() { project }: GraphQLContext) {
    return project;
  }

  @FieldResolver(() => StorageUsageType)
  storage(@Root() _project: unknown, @Ctx() { ctx, services }: GraphQLContext) {
    return services.projects.usage(ctx);
  }

  private async load(globalId: string, { ctx, project }: GraphQLContext) {
    const parsed = fromGlobalId(globalId);
    if (!parsed) return null;
    const l = ctx.loaders;
    switch (parsed.type) {
      case "Server":
        return l.server.load(parsed.id);
      case "Disk":
        return l.disk.load(parsed.id);
      case "Backup":
        return l.backup.load(parsed.id);
      case "Image":
        return l.image.load(parsed.id);
      case "ImageExport":
        return l.imageExport.load(parsed.id);
      case "Policy":
        return l.policy.load(parsed.id);
      case "Job":
        return l.job.load(parsed.id);
      case "NbdExport":
        return l.nbdExport.load(parsed.id);
      case "Project":
        return parsed.id === project.id ? project : null;
    }
  }
}
