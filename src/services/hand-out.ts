import type { JobEvent } from "../jobs/events";

/** One subscription's stream, as the hand-out sees it. */
export interface Receiver {
  /** Events heard since its last round began, the latest per job, in order. */
  incoming: JobEvent[];
  closed: boolean;
  /** Starts what must be read after an event (shared by every receiver of it), or null when that is done. */
  prepare(event: JobEvent): Promise<unknown> | null;
  /** Takes a round's events. */
  take(events: JobEvent[]): void;
}

/** How many receivers take their events in one turn of the event loop. */
const SLICE = 64;

/** Keeps the latest event per job in `list`, in the order they came. */
export function keepLatest(list: JobEvent[], event: JobEvent): void {
  const i = list.findIndex((q) => q.jobId === event.jobId);
  if (i >= 0) list.splice(i, 1);
  list.push(event);
}

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * Hands a project's job events to its subscriptions in rounds. A round takes what
 * every receiver heard so far, all at once, waits until each event's job has been
 * read, then hands the events over a slice of receivers per turn of the event loop.
 * Each receiver's work for its events (executing and sending the subscription's
 * result) runs in its slice's turn, so an event heard by thousands of subscriptions
 * holds the event loop for a slice at a time, not for all of them.
 *
 * Events that come during a round wait for the next one, the latest per job, the
 * same for every receiver: all the subscriptions of a project see the same states,
 * however slowly the rounds go. A receiver that has not consumed what it took keeps
 * only the latest per job (see the stream's own queue).
 */
export class HandOut {
  private readonly waiting = new Map<string, Set<Receiver>>();

  /** `receiver` of `projectId` heard an event: it takes part in the project's next round. */
  heard(projectId: string, receiver: Receiver): void {
    let set = this.waiting.get(projectId);
    if (set) {
      set.add(receiver);
      return;
    }
    this.waiting.set(projectId, (set = new Set([receiver])));
    // Every listener of the event is called before the round begins (the bus calls them all at once).
    void this.rounds(projectId, set);
  }

  private async rounds(projectId: string, set: Set<Receiver>): Promise<void> {
    try {
      await nextTurn();
      for (;;) {
        const round: [Receiver, JobEvent[]][] = [];
        for (const r of set) {
          if (r.closed || !r.incoming.length) continue;
          round.push([r, r.incoming]);
          r.incoming = [];
        }
        set.clear();
        if (!round.length) break;
        const reads = new Map<JobEvent, Promise<unknown>>();
        for (const [r, events] of round) {
          for (const e of events) {
            if (reads.has(e)) continue;
            const read = r.prepare(e);
            if (read) reads.set(e, read);
          }
        }
        await Promise.allSettled(reads.values()); // a failed read reaches each receiver through its own stream
        for (let i = 0; i < round.length; i += SLICE) {
          if (i > 0) await nextTurn();
          for (let k = i; k < Math.min(i + SLICE, round.length); k++) {
            const [r, events] = round[k];
            if (!r.closed) r.take(events);
          }
        }
        await nextTurn();
      }
    } finally {
      this.waiting.delete(projectId);
    }
  }
}
