import { Field, FieldResolver, ID, InterfaceType, Resolver, Root } from "type-graphql";
import { Backup, Disk, Image, ImageExport, Job, Policy, Project, Server } from "../../entities";
import { toGlobalId, type NodeType } from "../../services/global-id";

const TYPES: [new () => { id: string }, NodeType][] = [
  [Server, "Server"],
  [Disk, "Disk"],
  [Backup, "Backup"],
  [Image, "Image"],
  [ImageExport, "ImageExport"],
  [Policy, "Policy"],
  [Job, "Job"],
  [Project, "Project"],
];

/** The GraphQL type of an entity row. */
function nodeTypeOf(value: unknown): NodeType | undefined {
  return TYPES.find(([cls]) => value instanceof cls)?.[1];
}

function globalIdOf(value: { id: string }): string {
  const type = nodeTypeOf(value);
  if (!type) throw new Error("not a node");
  return toGlobalId(type, value.id);
}

@InterfaceType("Node", {
  description: "An object with a globally unique, opaque ID.",
  resolveType: (value) => nodeTypeOf(value),
})
export abstract class Node {
  @Field(() => ID, { description: "Globally unique and opaque; use it with node(id:)." })
  id: string;
}

/** Every node's `id` is its global ID; object types inherit this resolver from the interface. */
@Resolver(() => Node)
export class NodeIdResolver {
  @FieldResolver(() => ID)
  id(@Root() root: { id: string }): string {
    return globalIdOf(root);
  }
}
