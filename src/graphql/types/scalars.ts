import { GraphQLDateTime, GraphQLSafeInt } from "graphql-scalars";

export const SafeInt = GraphQLSafeInt;
export const DateTime = GraphQLDateTime;
