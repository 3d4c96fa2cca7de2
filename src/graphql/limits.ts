import {
  getNamedType,
  GraphQLError,
  isCompositeType,
  isInterfaceType,
  isObjectType,
  Kind,
  valueFromASTUntyped,
  type FragmentDefinitionNode,
  type GraphQLCompositeType,
  type GraphQLSchema,
  type OperationDefinitionNode,
  type SelectionSetNode,
  type ValidationRule,
} from "graphql";

export const DEFAULT_PAGE = 20;

type Fragments = Record<string, FragmentDefinitionNode>;

function depthOf(set: SelectionSetNode | undefined, fragments: Fragments, seen: Set<string>): number {
  if (!set) return 0;
  let max = 0;
  for (const sel of set.selections) {
    if (sel.kind === Kind.FIELD) {
      if (sel.name.value.startsWith("__")) continue; // introspection is bounded by the schema
      max = Math.max(max, sel.selectionSet ? 1 + depthOf(sel.selectionSet, fragments, seen) : 1);
    } else if (sel.kind === Kind.INLINE_FRAGMENT) {
      max = Math.max(max, depthOf(sel.selectionSet, fragments, seen));
    } else {
      const name = sel.name.value;
      const frag = fragments[name];
      if (!frag || seen.has(name)) continue; // cycles are reported by the standard rules
      max = Math.max(max, depthOf(frag.selectionSet, fragments, new Set([...seen, name])));
    }
  }
  return max;
}

/** Refuses operations nested deeper than `max` fields. */
export function depthLimit(max: number): ValidationRule {
  return (context) => {
    const doc = context.getDocument();
    const fragments: Fragments = {};
    for (const def of doc.definitions) if (def.kind === Kind.FRAGMENT_DEFINITION) fragments[def.name.value] = def;
    return {
      OperationDefinition(op) {
        const depth = depthOf(op.selectionSet, fragments, new Set());
        if (depth > max) {
          context.reportError(
            new GraphQLError(`query depth ${depth} exceeds the limit of ${max}`, { nodes: [op], extensions: { code: "QUERY_TOO_COMPLEX", limit: max, depth } }),
          );
        }
      },
    };
  };
}

/**
 * The cost of an operation: every field costs 1, and a list field multiplies the
 * cost of what it selects by the page size asked for (first/last, or the default),
 * or by the number of IDs for nodes(ids:). Variables are known, so this runs after
 * validation.
 */
export function operationCost(
  schema: GraphQLSchema,
  op: OperationDefinitionNode,
  fragments: Fragments,
  variables: Record<string, unknown>,
): number {
  const root = op.operation === "query" ? schema.getQueryType() : op.operation === "mutation" ? schema.getMutationType() : schema.getSubscriptionType();
  if (!root) return 0;

  const arg = (node: { arguments?: readonly { name: { value: string }; value: import("graphql").ValueNode }[] }, name: string): unknown => {
    const a = node.arguments?.find((x) => x.name.value === name);
    return a ? valueFromASTUntyped(a.value, variables) : undefined;
  };

  const cost = (set: SelectionSetNode, parent: GraphQLCompositeType, seen: Set<string>): number => {
    let total = 0;
    for (const sel of set.selections) {
      if (sel.kind === Kind.FIELD) {
        if (sel.name.value.startsWith("__")) continue;
        const fields = isObjectType(parent) || isInterfaceType(parent) ? parent.getFields() : {};
        const field = fields[sel.name.value];
        if (!field) continue;
        let child = 0;
        const type = getNamedType(field.type);
        if (sel.selectionSet && isCompositeType(type)) child = cost(sel.selectionSet, type, seen);
        let multiplier = 1;
        if (type.name.endsWith("Connection")) {
          const n = Number(arg(sel, "first") ?? arg(sel, "last") ?? DEFAULT_PAGE);
          multiplier = Number.isFinite(n) && n > 0 ? n : 1;
        } else if (sel.name.value === "nodes") {
          const ids = arg(sel, "ids");
          multiplier = Array.isArray(ids) ? Math.max(1, ids.length) : 1;
        }
        total += 1 + multiplier * child;
      } else if (sel.kind === Kind.INLINE_FRAGMENT) {
        const cond = sel.typeCondition ? schema.getType(sel.typeCondition.name.value) : parent;
        total += cost(sel.selectionSet, cond && isCompositeType(cond) ? cond : parent, seen);
      } else {
        const frag = fragments[sel.name.value];
        if (!frag || seen.has(frag.name.value)) continue;
        const cond = schema.getType(frag.typeCondition.name.value);
        total += cost(frag.selectionSet, cond && isCompositeType(cond) ? cond : parent, new Set([...seen, frag.name.value]));
      }
    }
    return total;
  };
  return cost(op.selectionSet, root, new Set());
}

export function costError(cost: number, max: number): GraphQLError {
  return new GraphQLError(`query cost ${cost} exceeds the limit of ${max}; ask for smaller pages or fewer nested lists`, {
    extensions: { code: "QUERY_TOO_COMPLEX", limit: max, cost, http: { status: 400 } },
  });
}
