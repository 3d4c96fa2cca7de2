import "reflect-metadata";
import { lexicographicSortSchema, printSchema, type GraphQLSchema } from "graphql";
import { buildSchemaSync } from "type-graphql";
import { BackupResolver } from "./resolvers/backup.resolver";
import { DiskResolver } from "./resolvers/disk.resolver";
import { ImageExportResolver, ImageResolver } from "./resolvers/image.resolver";
import { JobResolver } from "./resolvers/job.resolver";
import { NodeResolver } from "./resolvers/node.resolver";
import { PolicyResolver } from "./resolvers/policy.resolver";
import { ServerResolver } from "./resolvers/server.resolver";
import { NodeIdResolver } from "./types/node";
import { DateTime } from "./types/scalars";

export const resolvers = [NodeIdResolver, NodeResolver, ServerResolver, DiskResolver, BackupResolver, ImageResolver, ImageExportResolver, PolicyResolver, JobResolver] as const;

export function buildStowageSchema(): GraphQLSchema {
  return buildSchemaSync({
    resolvers: [...resolvers],
    scalarsMap: [{ type: Date, scalar: DateTime }],
    validate: false,
  });
}

/** The SDL checked in at schema/schema.graphql. */
export function printStowageSchema(schema: GraphQLSchema = buildStowageSchema()): string {
  return printSchema(lexicographicSortSchema(schema)) + "\n";
}
