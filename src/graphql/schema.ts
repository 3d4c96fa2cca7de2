import "reflect-metadata";
import { isObjectType, lexicographicSortSchema, printSchema, type GraphQLInterfaceType, type GraphQLSchema } from "graphql";
import { buildSchemaSync } from "type-graphql";
import { BackupResolver } from "./resolvers/backup.resolver";
import { DiskResolver } from "./resolvers/disk.resolver";
import { ImageExportResolver, ImageResolver } from "./resolvers/image.resolver";
import { JobResolver } from "./resolvers/job.resolver";
import { NbdExportResolver } from "./resolvers/nbd.resolver";
import { NodeResolver } from "./resolvers/node.resolver";
import { PolicyResolver } from "./resolvers/policy.resolver";
import { ServerResolver } from "./resolvers/server.resolver";
import { SubscriptionResolver } from "./resolvers/subscription.resolver";
import { guardTextArguments } from "./text-arguments";
import { NodeIdResolver, nodeTypeOf } from "./types/node";
import { DateTime } from "./types/scalars";

export const resolvers = [
  NodeIdResolver,
  NodeResolver,
  ServerResolver,
  DiskResolver,
  BackupResolver,
  ImageResolver,
  ImageExportResolver,
  PolicyResolver,
  JobResolver,
  NbdExportResolver,
  SubscriptionResolver,
] as const;

export function buildStowageSchema(): GraphQLSchema {
  const schema = buildSchemaSync({
    resolvers: [...resolvers],
    scalarsMap: [{ type: Date, scalar: DateTime }],
    validate: false,
    // Every subscription streams from the job event bus through its own subscribe function;
    // type-graphql insists on a topic-based PubSub all the same, which must never be used.
    pubSub: {
      publish: () => {
        throw new Error("topic publishing is not used; publish job events on the event bus");
      },
      subscribe: () => {
        throw new Error("topic subscriptions are not used");
      },
    },
  });
  // type-graphql makes the interface's type resolver async; the type of a row is known at once, and
  // compiled execution takes a type, not a promise of one.
  (schema.getType("Node") as GraphQLInterfaceType).resolveType = (value) => nodeTypeOf(value);
  // A list's size may come later than its page (a promise); compiled execution awaits what a
  // field's resolver returns, not a property read as it is.
  for (const type of Object.values(schema.getTypeMap())) {
    if (isObjectType(type) && type.name.endsWith("Connection")) {
      const field = type.getFields().totalCount;
      if (field && !field.resolve) field.resolve = (connection: { totalCount: number | Promise<number> }) => connection.totalCount;
    }
  }
  return guardTextArguments(schema);
}

/** The SDL checked in at schema/schema.graphql. */
export function printStowageSchema(schema: GraphQLSchema = buildStowageSchema()): string {
  return printSchema(lexicographicSortSchema(schema)) + "\n";
}
