import { getNamedType, isObjectType, Kind, type FieldNode, type GraphQLObjectType, type GraphQLResolveInfo, type SelectionSetNode } from "graphql";
import { Extensions } from "type-graphql";
import type { ListSelection } from "../services/pagination";

const READS = "reads";

/**
 * The entity properties a field resolver reads from its row besides the id. A list
 * reads only the columns its selected fields need: a plain field its own property,
 * a field resolver what it declares here. A field resolver that declares nothing
 * makes its lists read whole rows, so forgetting this costs speed, never a value.
 */
export const Reads = (...properties: string[]) => Extensions({ [READS]: properties });

/** The fields selected under `set` (fragments and inline fragments flattened), by name. */
function fieldsOf(set: SelectionSetNode | undefined, info: GraphQLResolveInfo, out: FieldNode[] = []): FieldNode[] {
  for (const s of set?.selections ?? []) {
    if (s.kind === Kind.FIELD) out.push(s);
    else if (s.kind === Kind.INLINE_FRAGMENT) fieldsOf(s.selectionSet, info, out);
    else {
      const fragment = info.fragments[s.name.value];
      if (fragment) fieldsOf(fragment.selectionSet, info, out);
    }
  }
  return out;
}

/** What the selected node fields read: their properties, or null when one of them needs the whole row. */
function propertiesOf(type: GraphQLObjectType, nodes: FieldNode[], info: GraphQLResolveInfo, into: Set<string>): boolean {
  const fields = type.getFields();
  for (const node of nodes.flatMap((n) => fieldsOf(n.selectionSet, info))) {
    const name = node.name.value;
    if (name === "__typename") continue;
    const field = fields[name];
    if (!field) return false;
    if (!field.resolve) {
      into.add(name);
      continue;
    }
    const reads = field.extensions?.[READS] as readonly string[] | undefined;
    if (!reads) return false;
    for (const p of reads) into.add(p);
  }
  return true;
}

const memo = new WeakMap<readonly FieldNode[], ListSelection>();

/**
 * What a connection field's selection reads of its list: the properties its nodes
 * need (under `nodes` and `edges { node }`) and whether it asks for `totalCount`.
 * The same for every parent at one place of a query, so computed once per document.
 */
export function listSelection(info: GraphQLResolveInfo): ListSelection {
  const known = memo.get(info.fieldNodes);
  if (known) return known;
  const connection = getNamedType(info.returnType);
  let count = false;
  let cursors = false;
  const nodeFields: FieldNode[] = [];
  for (const f of info.fieldNodes.flatMap((n) => fieldsOf(n.selectionSet, info))) {
    if (f.name.value === "totalCount") count = true;
    else if (f.name.value === "nodes") nodeFields.push(f);
    else if (f.name.value === "edges") {
      cursors = true;
      nodeFields.push(...fieldsOf(f.selectionSet, info).filter((e) => e.name.value === "node"));
    } else if (f.name.value === "pageInfo") cursors = true;
  }
  const nodeType = isObjectType(connection) ? getNamedType(connection.getFields().nodes?.type) : undefined;
  const properties = new Set<string>();
  const whole = !isObjectType(nodeType) || !propertiesOf(nodeType, nodeFields, info, properties);
  const selection: ListSelection = { properties: whole ? null : [...properties], count, cursors };
  memo.set(info.fieldNodes, selection);
  return selection;
}
