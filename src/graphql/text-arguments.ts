import { defaultFieldResolver, isObjectType, type GraphQLFieldResolver, type GraphQLSchema } from "graphql";
import { storableText } from "../services/validate";

/** Checks every string in a field's arguments, naming it as the services do: `name`, `dataDisks[0].name` inside `input`, `filter.name`, `ids[2]`. */
function checkValue(value: unknown, field: string): void {
  if (typeof value === "string") storableText(value, field);
  else if (Array.isArray(value)) value.forEach((v, i) => checkValue(v, `${field}[${i}]`));
  else if (value !== null && typeof value === "object" && !(value instanceof Date)) {
    for (const [key, v] of Object.entries(value)) checkValue(v, field ? `${field}.${key}` : key);
  }
}

function checkArgs(args: Record<string, unknown>): void {
  for (const [name, value] of Object.entries(args)) checkValue(value, name === "input" ? "" : name);
}

function guarded(resolve: GraphQLFieldResolver<unknown, unknown>): GraphQLFieldResolver<unknown, unknown> {
  return (root, args, context, info) => {
    checkArgs(args);
    return resolve(root, args, context, info);
  };
}

/**
 * The one gate every argument passes, over HTTP and WebSocket: text Postgres cannot store
 * (NUL, unpaired surrogates) is BAD_USER_INPUT naming the argument before any service sees
 * it, so a filter or description can never reach the database as an encoding error. The
 * check is synchronous, so it adds no tick before a field's DataLoader calls.
 */
export function guardTextArguments(schema: GraphQLSchema): GraphQLSchema {
  for (const type of Object.values(schema.getTypeMap())) {
    if (!isObjectType(type) || type.name.startsWith("__")) continue;
    for (const field of Object.values(type.getFields())) {
      if (field.args.length === 0) continue;
      field.resolve = guarded(field.resolve ?? defaultFieldResolver);
      if (field.subscribe) field.subscribe = guarded(field.subscribe);
    }
  }
  return schema;
}
