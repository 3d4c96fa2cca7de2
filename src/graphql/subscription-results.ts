import { createSourceEventStream, execute, print, type DocumentNode, type ExecutionArgs, type ExecutionResult } from "graphql";

type Result = ExecutionResult | Promise<ExecutionResult>;

/**
 * graphql's subscribe(), except that the subscriptions of one scope running the
 * same document with the same variables execute it once per event, not once each.
 * An event's payload is one object for every subscriber of its project (the
 * progress service shares what it read), so the payload keys the results it
 * produced; they live as long as it does. `scope` names what a result may depend on
 * besides the document, the variables and the payload (the project), or null where
 * nothing may be shared.
 *
 * With thousands of subscribers, executing the selection for each of them took
 * most of the CPU of an event.
 */
export function sharedSubscribe(scope: (args: ExecutionArgs) => string | null) {
  const results = new WeakMap<object, Map<string, Result>>();
  const texts = new WeakMap<DocumentNode, string>(); // subscriptions that send the same text share its document
  return async (args: ExecutionArgs) => {
    const source = await createSourceEventStream(args);
    if (!(Symbol.asyncIterator in source)) return source; // the errors of setting it up
    const run = (payload: unknown): Result => execute({ ...args, rootValue: payload });
    const within = scope(args);
    if (within === null) return mapResults(source, run);
    let text = texts.get(args.document);
    if (text === undefined) texts.set(args.document, (text = print(args.document)));
    const key = JSON.stringify([within, args.operationName ?? null, args.variableValues ?? null, text]);
    return mapResults(source, (payload) => {
      if (typeof payload !== "object" || payload === null) return run(payload);
      let byKey = results.get(payload);
      if (!byKey) results.set(payload, (byKey = new Map()));
      let result = byKey.get(key);
      if (!result) byKey.set(key, (result = run(payload)));
      return result;
    });
  };
}

/** The results of a stream's events; returning or throwing into it reaches the stream, so its subscription ends. */
function mapResults(events: AsyncIterable<unknown>, map: (payload: unknown) => Result): AsyncGenerator<ExecutionResult, void, void> {
  const source = events[Symbol.asyncIterator]();
  const end = { value: undefined, done: true } as const;
  const close = async () => {
    await source.return?.();
    return end;
  };
  const results = {
    async next(): Promise<IteratorResult<ExecutionResult, void>> {
      const next = await source.next();
      if (next.done) return end;
      try {
        return { value: await map(next.value), done: false };
      } catch (err) {
        await close();
        throw err;
      }
    },
    return: close,
    async throw(err: unknown) {
      await close();
      throw err;
    },
    [Symbol.asyncIterator]() {
      return results;
    },
    async [Symbol.asyncDispose]() {
      await close();
    },
  };
  return results as AsyncGenerator<ExecutionResult, void, void>;
}
