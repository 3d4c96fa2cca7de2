import { Field, FieldResolver, ID, InterfaceType, Resolver, Root } from "type-graphql";
import { Backup, Disk, Image, ImageExport, Job, NbdExport, Policy, Project, Server } from "../../entities";
import { toGlobalId, type NodeType } from "../../services/global-id";
import { Reads } from "../selection";

/** The GraphQL type of each entity a node of the graph is read from. */
const TYPE_OF_ENTITY = new Map<abstract new () => { id: string }, NodeType>([
  [Server, "Server"],
  [Disk, "Disk"],
  [Backup, "Backup"],
  [Image, "Image"],
  [ImageExport, "ImageExport"],
  [Policy, "Policy"],
  [Job, "Job"],
  [Project, "Project"],
  [NbdExport, "NbdExport"],
]);

/** The GraphQL type of an entity row. */
export function nodeTypeOf(value: unknown): NodeType | undefined {
  if (value === null || typeof value !== "object") return undefined;
  return TYPE_OF_ENTITY.get(value.constructor as new () => { id: string });
}

function globalIdOf(value: { id: string }): string {
  const type = nodeTypeOf(value);
  if (!type) throw new Error("not a node");
  return toGlobalId(type, value.id);
}

/** The entity each node object type is read from (set by `sourceEntity`). */
const ENTITY_OF_TYPE = new Map<abstract new () => unknown, abstract new () => unknown>();

@InterfaceType("Node", {
  description: "An object with a globally unique, opaque ID.",
  resolveType: (value) => nodeTypeOf(value),
})
export abstract class Node {
  @Field(() => ID, { description: "Globally unique and opaque; use it with node(id:)." })
  id: string;

  /**
   * An entity row counts as an instance of the object type it is read as (a Server
   * row is a ServerType, and every node row a Node). type-graphql hands a field
   * resolver its root as an instance of the resolver's type and copies any root
   * that is not one into a new object, property by property, once per field and
   * row; the rows of the graph are entities, so without this every `id`, `disks`
   * or `server` of every row would copy the row first.
   */
  static [Symbol.hasInstance](value: unknown): boolean {
    if (Function.prototype[Symbol.hasInstance].call(this, value)) return true;
    if (this === Node) return nodeTypeOf(value) !== undefined;
    const entity = ENTITY_OF_TYPE.get(this);
    return entity !== undefined && value instanceof entity;
  }
}

/** Declares the entity an object type's rows are. */
export function sourceEntity(type: abstract new () => Node, entity: abstract new () => unknown): void {
  ENTITY_OF_TYPE.set(type, entity);
}

/** Every node's `id` is its global ID; object types inherit this resolver from the interface. */
@Resolver(() => Node)
export class NodeIdResolver {
  @FieldResolver(() => ID)
  @Reads()
  id(@Root() root: { id: string }): string {
    return globalIdOf(root);
  }
}
