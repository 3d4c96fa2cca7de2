import "reflect-metadata";
import { lexicographicSortSchema, printSchema, type GraphQLSchema } from "graphql";
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
import { NodeIdResolver } from "./types/node";
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
  return guardTextArguments(schema);
}

/** The SDL checked in at schema/schema.graphql. */
export function printStowageSchema(schema: GraphQLSchema = buildStowageSchema()): string {
  return printSchema(lexicographicSortSchema(schema)) + "\n";
}
