/** Runs `capture` while the writes it holds cannot move. */
export type Holder = <T>(capture: () => Promise<T>) => Promise<T>;

/**
 * Writes can be acknowledged before they are committed (NBD buffers them). A
 * backup captures its disks through `hold`: each holder (the NBD server) commits
 * what it has acknowledged and commits nothing more until the capture's transaction
 * has ended, so the backup holds exactly the writes acknowledged before its instant.
 */
export class CaptureGate {
  private readonly holders: Holder[] = [];

  register(holder: Holder): () => void {
    this.holders.push(holder);
    return () => {
      const i = this.holders.indexOf(holder);
      if (i >= 0) this.holders.splice(i, 1);
    };
  }

  hold<T>(capture: () => Promise<T>): Promise<T> {
    return this.holders.reduce<() => Promise<T>>((inner, holder) => () => holder(inner), capture)();
  }
}
