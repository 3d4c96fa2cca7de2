/**
 * Postgres advisory lock keys, in one place so no two uses collide. Two-key locks
 * take (key, hashtext(name)); the migration lock is a single bigint key, which
 * Postgres keeps apart from every two-key lock.
 */
export const AdvisoryLock = {
  /** Migrations, one process at a time. */
  MIGRATIONS: 0x5707_a6e,
  /** A project's vault garbage collection, one collector at a time: (VAULT, hashtext('vault:' || project)). */
  VAULT: 0x5707,
  /** A disk's write lock: writes, restores and compaction of one disk one at a time: (DISK, hashtext(disk)). */
  DISK: 0x5708,
  /** One compaction pass at a time, across processes: (COMPACTION_PASS, 0). */
  COMPACTION_PASS: 0x5709,
  /** The owner of a disk's NBD write journal, held by a session while its writes are served there: (NBD_JOURNAL, hashtext(disk)). */
  NBD_JOURNAL: 0x570a,
} as const;
