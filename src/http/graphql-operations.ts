import { GraphQLError, Kind, type DocumentNode, type FragmentDefinitionNode, type GraphQLSchema, type OperationDefinitionNode } from "graphql";
import type { DataSource } from "typeorm";
import type { Config } from "../config";
import type { Project } from "../entities";
import type { GraphQLContext } from "../graphql/context";
import { createErrorFormatter, requestRefusal } from "../graphql/errors";
import { aliasLimit, costError, depthLimit, MutationRateLimiter, mutationCount, mutationLimit, operationCost } from "../graphql/limits";
import type { Logger } from "../logger";
import type { Services } from "../services";
import { RequestContext } from "../services/context";
import { DomainError } from "../domain/errors";

function fragmentsOf(doc: DocumentNode): Record<string, FragmentDefinitionNode> {
  const out: Record<string, FragmentDefinitionNode> = {};
  for (const d of doc.definitions) if (d.kind === Kind.FRAGMENT_DEFINITION) out[d.name.value] = d;
  return out;
}

/**
 * What GraphQL over HTTP and over WebSocket share: the request context, the limits
 * on a document (depth, aliases, mutations, tokens, cost, the mutation rate) and
 * the error formatting, so both transports refuse and answer alike.
 */
export function graphqlOperations(deps: { config: Config; logger: Logger; ds: DataSource; services: Services; schema: GraphQLSchema }) {
  const { config, schema } = deps;
  const validationRules = [depthLimit(config.maxQueryDepth), aliasLimit(config.maxQueryAliases), mutationLimit(config.maxMutationsPerRequest)];
  const parseOptions = { maxTokens: config.maxQueryTokens };
  const mutations = new MutationRateLimiter(config.mutationsPerMinute, config.mutationBurst);
  const { formatError, report } = createErrorFormatter(deps.logger);

  const makeContext = (project: Project): GraphQLContext => ({
    ctx: new RequestContext(project.id, deps.ds, config),
    project,
    services: deps.services,
  });

  /** The error refusing an operation past the cost limit or the project's mutation rate (its mutations are taken from the bucket), or nothing. */
  const refusal = (project: Project, op: OperationDefinitionNode, document: DocumentNode, variables: Record<string, unknown>): GraphQLError | undefined => {
    const fragments = fragmentsOf(document);
    const cost = operationCost(schema, op, fragments, variables);
    if (cost > config.maxQueryCost) return costError(cost, config.maxQueryCost);
    try {
      mutations.take(project.id, mutationCount(op, fragments));
      return undefined;
    } catch (err) {
      if (err instanceof DomainError) return requestRefusal(err);
      throw err;
    }
  };

  /** A request's errors, logged once with its project and operation, then formatted. */
  const formatErrors = (errors: readonly GraphQLError[], project: Project | undefined, operation: string | null | undefined) => {
    report(errors, { project: project?.id, operation });
    return errors.map((e) => formatError(e.toJSON(), e));
  };

  return { validationRules, parseOptions, makeContext, refusal, formatError, report, formatErrors };
}

export type GraphQLOperations = ReturnType<typeof graphqlOperations>;
