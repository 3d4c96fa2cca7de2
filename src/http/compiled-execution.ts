import type { ApolloServerOptionsWithGateway } from "@apollo/server";
import {
  astFromValue,
  getNullableType,
  getVariableValues,
  GraphQLError,
  isInputObjectType,
  isListType,
  typeFromAST,
  valueFromASTUntyped,
  type ExecutionResult,
  type GraphQLInputType,
  type GraphQLSchema,
  type OperationDefinitionNode,
} from "graphql";
import { compileQuery, isCompiledQuery, type CompiledQuery } from "graphql-jit";

type Compiled = CompiledQuery<Record<string, unknown>, Record<string, unknown>>;

type GatewayInterface = ApolloServerOptionsWithGateway<object>["gateway"];
type GatewayExecutor = NonNullable<Awaited<ReturnType<GatewayInterface["load"]>>["executor"]>;

/** Compiled operations kept, by document and operation name; a console sends a few dozen. */
const MAX_COMPILED = 500;

/**
 * Runs Apollo's operations as code compiled once per document (graphql-jit) instead of
 * having graphql-js interpret the document for every request: the same schema, resolvers,
 * errors and answers, with far less work per field on the lists a console reads. Apollo
 * still parses, validates and runs its plugins as before; only execution moves here,
 * through Apollo's gateway hook (the schema is the local one, never loaded from elsewhere).
 */
export function compiledExecution(schema: GraphQLSchema): GatewayInterface {
  const compiled = new Map<string, Compiled>();

  /** The operation compiled, or the errors that kept it from compiling. */
  const compile = (rc: Parameters<GatewayExecutor>[0]): Compiled | ExecutionResult => {
    const key = `${rc.operationName ?? ""}\0${rc.queryHash}`;
    const found = compiled.get(key);
    if (found) {
      // Most recently used last: the first is the one to drop.
      compiled.delete(key);
      compiled.set(key, found);
      return found;
    }
    const result = compileQuery(schema, rc.document, rc.operationName ?? undefined, { disablingCapturingStackErrors: true }) as Compiled | ExecutionResult;
    if (!isCompiledQuery(result)) return result;
    if (compiled.size >= MAX_COMPILED) compiled.delete(compiled.keys().next().value!);
    compiled.set(key, result);
    return result;
  };

  const executor: GatewayExecutor = async (rc) => {
    type Result = Awaited<ReturnType<GatewayExecutor>>;
    // Variables are checked by graphql-js, so a bad one is refused with its usual error (Apollo's
    // BAD_USER_INPUT); the compiled query then reads them with the defaults of omitted input fields filled in.
    const inputs = rc.request.variables ?? {};
    const checked = getVariableValues(schema, rc.operation.variableDefinitions ?? [], inputs);
    if (checked.errors) return { errors: checked.errors } as Result;
    const query = compile(rc);
    const result = isCompiledQuery(query) ? await query.query(undefined, rc.context, withInputDefaults(schema, rc.operation, inputs)) : query;
    return (result.errors ? { ...result, errors: result.errors.map(asGraphQLError) } : result) as Result;
  };

  return {
    async load() {
      return { executor };
    },
    onSchemaLoadOrUpdate(callback) {
      callback({ apiSchema: schema, coreSupergraphSdl: "" });
      return () => undefined;
    },
    async stop() {},
  };
}

/**
 * graphql-jit's errors are its own kind of GraphQLError, with no extensions unless the
 * original error has some; Apollo and the error formatter take graphql-js's, as execution
 * by graphql-js makes them: the same message, locations, path and original error.
 */
function asGraphQLError(e: GraphQLError): GraphQLError {
  const error = new GraphQLError(e.message, { path: e.path, originalError: e.originalError ?? undefined, extensions: e.extensions ?? undefined });
  if (e.locations) Object.defineProperty(error, "locations", { value: e.locations, enumerable: true, configurable: true });
  return error;
}

/**
 * The variables with every omitted input-object field that has a default set to it, as
 * graphql-js's coercion would (graphql-jit's refuses an omitted non-null field even when it
 * has a default). Copies; the request's variables are left as they are.
 */
function withInputDefaults(schema: GraphQLSchema, operation: OperationDefinitionNode, inputs: Record<string, unknown>): Record<string, unknown> {
  const fill = (type: GraphQLInputType, value: unknown): unknown => {
    if (value == null) return value;
    const t = getNullableType(type);
    if (isListType(t)) return Array.isArray(value) ? value.map((v) => fill(t.ofType, v)) : fill(t.ofType, value);
    if (!isInputObjectType(t) || typeof value !== "object") return value;
    const out: Record<string, unknown> = { ...(value as Record<string, unknown>) };
    for (const field of Object.values(t.getFields())) {
      if (Object.prototype.hasOwnProperty.call(out, field.name)) out[field.name] = fill(field.type, out[field.name]);
      else if (field.defaultValue !== undefined) {
        const ast = astFromValue(field.defaultValue, field.type);
        if (ast) out[field.name] = valueFromASTUntyped(ast);
      }
    }
    return out;
  };
  const out: Record<string, unknown> = { ...inputs };
  for (const def of operation.variableDefinitions ?? []) {
    const name = def.variable.name.value;
    const type = typeFromAST(schema, def.type) as GraphQLInputType | undefined;
    if (type && Object.prototype.hasOwnProperty.call(out, name)) out[name] = fill(type, out[name]);
  }
  return out;
}
