import {
  getArgumentValues,
  getNamedType,
  getVariableValues,
  GraphQLError,
  isAbstractType,
  isCompositeType,
  isEnumType,
  isInputObjectType,
  isInterfaceType,
  isIntrospectionType,
  isObjectType,
  Kind,
  SchemaMetaFieldDef,
  TypeMetaFieldDef,
  type DocumentNode,
  type FieldNode,
  type FragmentDefinitionNode,
  type GraphQLCompositeType,
  type GraphQLField,
  type GraphQLNamedType,
  type GraphQLSchema,
  type OperationDefinitionNode,
  type SelectionSetNode,
  type ValidationRule,
} from "graphql";
import { rateLimited } from "../domain/errors";

const DEFAULT_PAGE = 20;

type Fragments = Record<string, FragmentDefinitionNode>;

/**
 * Depth of a selection set. Fragments are measured once each: a document that
 * spreads one fragment many times at every level must not make this exponential.
 */
function depthOf(set: SelectionSetNode, fragments: Fragments, memo: Map<string, number>): number {
  let max = 0;
  for (const sel of set.selections) {
    if (sel.kind === Kind.FIELD) {
      // The introspection query nests deeper than an API query needs to; its size is bounded by the cost limit.
      if (sel.name.value.startsWith("__")) continue;
      max = Math.max(max, sel.selectionSet ? 1 + depthOf(sel.selectionSet, fragments, memo) : 1);
    } else if (sel.kind === Kind.INLINE_FRAGMENT) {
      max = Math.max(max, depthOf(sel.selectionSet, fragments, memo));
    } else {
      const name = sel.name.value;
      const frag = fragments[name];
      if (!frag) continue;
      if (!memo.has(name)) {
        memo.set(name, 0); // a cycle counts as nothing here; the standard rules report it
        memo.set(name, depthOf(frag.selectionSet, fragments, memo));
      }
      max = Math.max(max, memo.get(name)!);
    }
  }
  return max;
}

/** Refuses operations nested deeper than `max` fields. */
export function depthLimit(max: number): ValidationRule {
  return (context) => {
    const fragments = fragmentsOf(context.getDocument());
    const memo = new Map<string, number>();
    return {
      OperationDefinition(op) {
        const depth = depthOf(op.selectionSet, fragments, memo);
        if (depth > max) {
          context.reportError(new GraphQLError(`query depth ${depth} exceeds the limit of ${max}`, { nodes: [op], extensions: { code: "QUERY_TOO_COMPLEX", limit: max, depth } }));
        }
      },
    };
  };
}

function fragmentsOf(doc: DocumentNode): Fragments {
  const fragments: Fragments = {};
  for (const def of doc.definitions) if (def.kind === Kind.FRAGMENT_DEFINITION) fragments[def.name.value] = def;
  return fragments;
}

/** Aliased fields in a selection set, each fragment counted once per spread (memoised, as in depthOf). */
function aliasesOf(set: SelectionSetNode, fragments: Fragments, memo: Map<string, number>): number {
  let count = 0;
  for (const sel of set.selections) {
    if (sel.kind === Kind.FIELD) count += (sel.alias ? 1 : 0) + (sel.selectionSet ? aliasesOf(sel.selectionSet, fragments, memo) : 0);
    else if (sel.kind === Kind.INLINE_FRAGMENT) count += aliasesOf(sel.selectionSet, fragments, memo);
    else {
      const frag = fragments[sel.name.value];
      if (!frag) continue;
      if (!memo.has(frag.name.value)) {
        memo.set(frag.name.value, 0); // cycles are reported by the standard rules
        memo.set(frag.name.value, aliasesOf(frag.selectionSet, fragments, memo));
      }
      count += memo.get(frag.name.value)!;
    }
  }
  return Math.min(count, Number.MAX_SAFE_INTEGER);
}

/**
 * Refuses operations with more than `max` aliased fields: each alias runs its field
 * once more (12,000 aliases of one cheap field ran for seconds), while repeating a
 * field without an alias merges into one.
 */
export function aliasLimit(max: number): ValidationRule {
  return (context) => {
    const fragments = fragmentsOf(context.getDocument());
    const memo = new Map<string, number>();
    return {
      OperationDefinition(op) {
        const aliases = aliasesOf(op.selectionSet, fragments, memo);
        if (aliases > max) {
          context.reportError(new GraphQLError(`${aliases} aliased fields exceed the limit of ${max}`, { nodes: [op], extensions: { code: "QUERY_TOO_COMPLEX", limit: max, aliases } }));
        }
      },
    };
  };
}

/** The root fields a mutation runs: one per response name, fragments included. */
export function mutationCount(op: OperationDefinitionNode, fragments: Fragments): number {
  if (op.operation !== "mutation") return 0;
  const names = new Set<string>();
  const seen = new Set<string>();
  const walk = (set: SelectionSetNode) => {
    for (const sel of set.selections) {
      if (sel.kind === Kind.FIELD) names.add((sel.alias ?? sel.name).value);
      else if (sel.kind === Kind.INLINE_FRAGMENT) walk(sel.selectionSet);
      else if (fragments[sel.name.value] && !seen.has(sel.name.value)) {
        seen.add(sel.name.value);
        walk(fragments[sel.name.value].selectionSet);
      }
    }
  };
  walk(op.selectionSet);
  return names.size;
}

/** Refuses a mutation operation running more than `max` mutations; each is a job or a change, and counts against the rate limit. */
export function mutationLimit(max: number): ValidationRule {
  return (context) => {
    const fragments = fragmentsOf(context.getDocument());
    return {
      OperationDefinition(op) {
        const count = mutationCount(op, fragments);
        if (count > max) {
          context.reportError(
            new GraphQLError(`${count} mutations in one request exceed the limit of ${max}; send them in several requests`, {
              nodes: [op],
              extensions: { code: "QUERY_TOO_COMPLEX", limit: max, mutations: count },
            }),
          );
        }
      },
    };
  };
}

/**
 * Token buckets of mutations, one per project, in this process's memory: each holds
 * up to `burst` mutations and refills at `perMinute`. Several processes each keep
 * their own, so the rate a project gets grows with the number of API processes.
 */
export class MutationRateLimiter {
  private readonly buckets = new Map<string, { tokens: number; at: number }>();
  private readonly perMs: number;

  constructor(
    private readonly perMinute: number,
    private readonly burst: number,
    private readonly now: () => number = () => performance.now(),
  ) {
    this.perMs = perMinute / 60_000;
  }

  /** Takes `count` mutations from the project's bucket; throws RATE_LIMITED, taking nothing, when it holds fewer. */
  take(projectId: string, count: number): void {
    if (this.perMinute === 0 || count === 0) return;
    const now = this.now();
    const bucket = this.buckets.get(projectId) ?? { tokens: this.burst, at: now };
    bucket.tokens = Math.min(this.burst, bucket.tokens + (now - bucket.at) * this.perMs);
    bucket.at = now;
    if (bucket.tokens < count) {
      this.buckets.set(projectId, bucket);
      const retryAfterSeconds = Math.max(1, Math.ceil((count - bucket.tokens) / this.perMs / 1000));
      throw rateLimited(`this project sent more than ${this.perMinute} mutations a minute (bursts of ${this.burst}); retry in ${retryAfterSeconds} s`, retryAfterSeconds);
    }
    bucket.tokens -= count;
    this.buckets.set(projectId, bucket);
    // A full bucket is the same as none: forget those now and then, so idle projects cost no memory.
    if (this.buckets.size > 10_000) {
      for (const [id, b] of this.buckets) if (b.tokens + (now - b.at) * this.perMs >= this.burst) this.buckets.delete(id);
    }
  }
}

/**
 * How many items an introspection list holds on average, from the schema itself:
 * introspection can loop (__Type.fields -> __Field.type -> __Type.fields ...), so
 * it is costed like any other list rather than waved through.
 */
const introspectionSizes = new WeakMap<GraphQLSchema, Record<string, number>>();
function introspectionSizesOf(schema: GraphQLSchema): Record<string, number> {
  let sizes = introspectionSizes.get(schema);
  if (sizes) return sizes;
  const types = Object.values(schema.getTypeMap());
  // Per type on average over all types, so that `types { fields }` costs what it returns.
  const perType = (count: (t: GraphQLNamedType) => number) => Math.max(1, Math.ceil(types.reduce((sum, t) => sum + count(t), 0) / types.length));
  const fieldsOf = (t: GraphQLNamedType) => (isObjectType(t) || isInterfaceType(t) ? Object.values(t.getFields()) : []);
  const allFields = types.flatMap(fieldsOf);
  const directives = schema.getDirectives();
  sizes = {
    "__Schema.types": types.length,
    "__Schema.directives": directives.length,
    "__Type.fields": perType((t) => fieldsOf(t).length),
    "__Type.interfaces": perType((t) => (isObjectType(t) || isInterfaceType(t) ? t.getInterfaces().length : 0)),
    "__Type.possibleTypes": perType((t) => (isAbstractType(t) ? schema.getPossibleTypes(t).length : 0)),
    "__Type.enumValues": perType((t) => (isEnumType(t) ? t.getValues().length : 0)),
    "__Type.inputFields": perType((t) => (isInputObjectType(t) ? Object.keys(t.getFields()).length : 0)),
    "__Field.args": Math.max(1, Math.ceil(allFields.reduce((sum, f) => sum + f.args.length, 0) / Math.max(1, allFields.length))),
    "__Directive.args": Math.max(1, Math.ceil(directives.reduce((sum, d) => sum + d.args.length, 0) / Math.max(1, directives.length))),
  };
  introspectionSizes.set(schema, sizes);
  return sizes;
}

/**
 * The cost of an operation: every field costs 1, and a list field multiplies the
 * cost of what it selects by the page size asked for (first/last, or the default),
 * by the number of IDs for nodes(ids:), or for introspection lists by their size in
 * this schema. Arguments are read the way execution reads them (variables coerced,
 * defaults of variables and arguments applied), so a page size cannot hide behind a
 * variable. Runs after validation.
 */
export function operationCost(schema: GraphQLSchema, op: OperationDefinitionNode, fragments: Fragments, variables: Record<string, unknown>): number {
  const root = op.operation === "query" ? schema.getQueryType() : op.operation === "mutation" ? schema.getMutationType() : schema.getSubscriptionType();
  if (!root) return 0;
  const introspection = introspectionSizesOf(schema);

  // Variables that do not coerce fail execution anyway; count with what was sent.
  const coerced = getVariableValues(schema, op.variableDefinitions ?? [], variables, { maxErrors: 1 });
  const variableValues = coerced.coerced ?? variables;
  const argsOf = (field: GraphQLField<unknown, unknown>, node: FieldNode): Record<string, unknown> => {
    try {
      return getArgumentValues(field, node, variableValues);
    } catch {
      return {};
    }
  };

  const fieldOf = (parent: GraphQLCompositeType, name: string): GraphQLField<unknown, unknown> | undefined => {
    if (parent === root && name === SchemaMetaFieldDef.name) return SchemaMetaFieldDef;
    if (parent === root && name === TypeMetaFieldDef.name) return TypeMetaFieldDef;
    return isObjectType(parent) || isInterfaceType(parent) ? parent.getFields()[name] : undefined;
  };

  // A fragment costs the same wherever it is spread: count it once (see depthOf).
  const fragmentCost = new Map<string, number>();
  const cost = (set: SelectionSetNode, parent: GraphQLCompositeType): number => {
    let total = 0;
    for (const sel of set.selections) {
      if (sel.kind === Kind.FIELD) {
        const field = fieldOf(parent, sel.name.value);
        if (!field) continue; // __typename, or unknown (validation reports it)
        let child = 0;
        const type = getNamedType(field.type);
        if (sel.selectionSet && isCompositeType(type)) child = cost(sel.selectionSet, type);
        let multiplier = 1;
        if (type.name.endsWith("Connection")) {
          const args = argsOf(field, sel);
          const n = Number(args.first ?? args.last ?? DEFAULT_PAGE);
          multiplier = Number.isFinite(n) && n > 0 ? n : 1;
        } else if (sel.name.value === "nodes" && field.args.some((a) => a.name === "ids")) {
          const ids = argsOf(field, sel).ids;
          multiplier = Array.isArray(ids) ? Math.max(1, ids.length) : 1;
        } else if (isIntrospectionType(parent)) {
          multiplier = introspection[`${parent.name}.${field.name}`] ?? 1;
        }
        total += 1 + multiplier * child;
      } else if (sel.kind === Kind.INLINE_FRAGMENT) {
        const cond = sel.typeCondition ? schema.getType(sel.typeCondition.name.value) : parent;
        total += cost(sel.selectionSet, cond && isCompositeType(cond) ? cond : parent);
      } else {
        const name = sel.name.value;
        const frag = fragments[name];
        if (!frag) continue;
        if (!fragmentCost.has(name)) {
          fragmentCost.set(name, 0); // cycles are invalid and reported by validation
          const cond = schema.getType(frag.typeCondition.name.value);
          fragmentCost.set(name, cost(frag.selectionSet, cond && isCompositeType(cond) ? cond : parent));
        }
        total += fragmentCost.get(name)!;
      }
    }
    return total;
  };
  return cost(op.selectionSet, root);
}

export function costError(rawCost: number, max: number): GraphQLError {
  const cost = Math.min(rawCost, Number.MAX_SAFE_INTEGER); // fragment-heavy documents reach astronomic numbers
  return new GraphQLError(`query cost ${cost} exceeds the limit of ${max}; ask for smaller pages or fewer nested lists`, {
    extensions: { code: "QUERY_TOO_COMPLEX", limit: max, cost, http: { status: 400 } },
  });
}
