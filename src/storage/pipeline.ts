/**
 * Runs `fn` over `items` with at most `limit` calls in flight, yielding the
 * results in the order of the items: reads, compression and writes of
 * neighbouring batches overlap while memory stays bounded by `limit` batches.
 */
export async function* mapOrdered<T, U>(items: AsyncIterable<T> | Iterable<T>, limit: number, fn: (item: T) => Promise<U>): AsyncGenerator<U> {
  const queue: Promise<U>[] = [];
  try {
    for await (const item of items) {
      const p = fn(item);
      p.catch(() => undefined); // awaited in turn below; no unhandled rejection meanwhile
      queue.push(p);
      if (queue.length >= limit) yield await queue.shift()!;
    }
    while (queue.length) yield await queue.shift()!;
  } finally {
    // A consumer that stops early (or a failure) leaves no work running behind it.
    await Promise.allSettled(queue);
  }
}
