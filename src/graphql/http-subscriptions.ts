import type { ApolloServerPlugin } from "@apollo/server";
import { GraphQLError } from "graphql";

/**
 * Subscriptions stream over the graphql-ws protocol; over HTTP their fields would run
 * without an event to resolve. A subscription sent by POST or GET is refused as a bad
 * request that says where to send it.
 */
export const refuseHttpSubscriptions: ApolloServerPlugin = {
  async requestDidStart() {
    return {
      async didResolveOperation(rc) {
        if (rc.operation?.operation !== "subscription") return;
        throw new GraphQLError("subscriptions are not served over HTTP; open a WebSocket to the same path (/graphql) with the graphql-ws protocol", {
          extensions: { code: "BAD_REQUEST", http: { status: 400 } },
        });
      },
    };
  },
};
