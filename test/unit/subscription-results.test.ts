/**
 * sharedSubscribe: subscriptions of one scope with the same document and variables
 * execute once per event payload; anything else executes on its own, and ending a
 * subscription ends its source stream.
 */
import { GraphQLObjectType, GraphQLSchema, GraphQLString, parse, type ExecutionResult } from "graphql";
import { sharedSubscribe } from "../../src/graphql/subscription-results";

interface Payload {
  name: string;
}

/** A schema whose one subscription streams what `feed` pushes, counting the executions of its field. */
function setup() {
  const listeners = new Set<(p: Payload) => void>();
  let executions = 0;
  let closed = 0;
  const stream = (): AsyncIterableIterator<Payload> => {
    const queue: Payload[] = [];
    let waiting: ((r: IteratorResult<Payload>) => void) | null = null;
    const listener = (p: Payload) => (waiting ? (waiting({ value: p, done: false }), (waiting = null)) : queue.push(p));
    listeners.add(listener);
    const it: AsyncIterableIterator<Payload> = {
      next: () => (queue.length ? Promise.resolve({ value: queue.shift()!, done: false }) : new Promise((r) => (waiting = r))),
      return: async () => {
        closed++;
        listeners.delete(listener);
        waiting?.({ value: undefined, done: true });
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]: () => it,
    };
    return it;
  };
  const schema = new GraphQLSchema({
    query: new GraphQLObjectType({ name: "Query", fields: { x: { type: GraphQLString } } }),
    subscription: new GraphQLObjectType({
      name: "Subscription",
      fields: {
        changed: {
          type: GraphQLString,
          args: { prefix: { type: GraphQLString } },
          subscribe: () => stream(),
          resolve: (p: Payload, args: { prefix?: string }) => {
            executions++;
            return `${args.prefix ?? ""}${p.name}`;
          },
        },
      },
    }),
  });
  return {
    schema,
    feed: (p: Payload) => listeners.forEach((l) => l(p)),
    executions: () => executions,
    closed: () => closed,
  };
}

const DOC = `subscription ($p: String) { changed(prefix: $p) }`;

it("executes once per payload for the same scope, document and variables, and on its own otherwise", async () => {
  const s = setup();
  const subscribe = sharedSubscribe((args) => (args.contextValue as { scope: string | null }).scope);
  const open = async (scope: string | null, variables: Record<string, unknown> = {}, doc = DOC) =>
    (await subscribe({ schema: s.schema, document: parse(doc), variableValues: variables, contextValue: { scope } })) as AsyncGenerator<ExecutionResult>;
  const same = await Promise.all([open("a"), open("a"), open("a")]);
  const otherScope = await open("b");
  const otherVariables = await open("a", { p: "> " });
  const otherDocument = await open("a", {}, `subscription Named { changed }`);
  const unshared = await open(null);
  const all = [...same, otherScope, otherVariables, otherDocument, unshared];

  const nexts = all.map((it) => it.next());
  s.feed({ name: "one" });
  const results = await Promise.all(nexts);
  expect(results.map((r) => r.value.data)).toEqual([...Array(4).fill({ changed: "one" }), { changed: "> one" }, { changed: "one" }, { changed: "one" }]);
  // The three alike once; the other scope, the other variables, the other document and the unshared one each once.
  expect(s.executions()).toBe(5);
  // A new payload is executed again; the same payload object once more only by the unshared subscription.
  const two = { name: "two" };
  for (let round = 0; round < 2; round++) {
    const next = all.map((it) => it.next());
    s.feed(two);
    expect((await Promise.all(next)).map((r) => r.value.data.changed)).toEqual([...Array(4).fill("two"), "> two", "two", "two"]);
    expect(s.executions()).toBe(round === 0 ? 10 : 11);
  }

  for (const it of all) await it.return(undefined);
  expect(s.closed()).toBe(all.length);
});

it("returns the errors of a subscription that cannot start instead of a stream", async () => {
  const s = setup();
  const subscribe = sharedSubscribe(() => "a");
  const result = await subscribe({ schema: s.schema, document: parse(`subscription { nothing }`) });
  expect(Symbol.asyncIterator in result).toBe(false);
  expect((result as ExecutionResult).errors?.length).toBeGreaterThan(0);
});

it("ends a pending read at once when the subscription is returned", async () => {
  const s = setup();
  const subscribe = sharedSubscribe(() => "a");
  const it = (await subscribe({ schema: s.schema, document: parse(DOC) })) as AsyncGenerator<ExecutionResult>;
  const pending = it.next();
  await it.return(undefined);
  await expect(pending).resolves.toEqual({ value: undefined, done: true });
  expect(s.closed()).toBe(1);
});
