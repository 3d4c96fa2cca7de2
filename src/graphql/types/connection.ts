import { ArgsType, Field, InputType, Int, ObjectType, type ClassType } from "type-graphql";
import { OrderDirection, OrderField, TimeOrderField } from "./enums";

@ObjectType({ simpleResolvers: true, description: "Relay page information." })
export class PageInfo {
  @Field() hasNextPage: boolean;
  @Field() hasPreviousPage: boolean;
  @Field(() => String, { nullable: true }) startCursor: string | null;
  @Field(() => String, { nullable: true }) endCursor: string | null;
}

@ArgsType()
export class PageArgs {
  @Field(() => Int, { nullable: true, description: "Return the first n items after `after`." }) first?: number | null;
  @Field(() => String, { nullable: true }) after?: string | null;
  @Field(() => Int, { nullable: true, description: "Return the last n items before `before`." }) last?: number | null;
  @Field(() => String, { nullable: true }) before?: string | null;
}

@InputType({ description: "Sort order; ties are broken by ID." })
export class Order {
  @Field(() => OrderField, { defaultValue: OrderField.CREATED_AT }) field: OrderField;
  @Field(() => OrderDirection, { defaultValue: OrderDirection.ASC }) direction: OrderDirection;
}

@InputType({ description: "Sort order by time; ties are broken by ID." })
export class TimeOrder {
  @Field(() => TimeOrderField, { defaultValue: TimeOrderField.CREATED_AT }) field: TimeOrderField;
  @Field(() => OrderDirection, { defaultValue: OrderDirection.ASC }) direction: OrderDirection;
}

/** `XConnection` and `XEdge` types for node type X. */
export function connectionOf<T extends object>(name: string, node: ClassType<T>) {
  @ObjectType(`${name}Edge`, { simpleResolvers: true })
  class Edge {
    @Field() cursor: string;
    @Field(() => node) node: T;
  }
  @ObjectType(`${name}Connection`, { simpleResolvers: true })
  class Connection {
    @Field(() => [Edge]) edges: Edge[];
    @Field(() => [node]) nodes: T[];
    @Field(() => PageInfo) pageInfo: PageInfo;
    @Field(() => Int, { description: "Items in the whole list, filters applied." }) totalCount: number;
  }
  return Connection;
}
