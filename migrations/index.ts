import { Initial1764000000000 } from "./1764000000000-initial";
import { DataPlane1764100000000 } from "./1764100000000-data-plane";
import { Images1764200000000 } from "./1764200000000-images";
import { PolicyRuns1764300000000 } from "./1764300000000-policy-runs";
import { FailuresAndWork1765000000000 } from "./1765000000000-failures-and-work";
import { SegmentLiveBlocks1765100000000 } from "./1765100000000-segment-live-blocks";
import { StagedRestores1765200000000 } from "./1765200000000-staged-restores";
import { PendingBlobs1765300000000 } from "./1765300000000-pending-blobs";
import { DropBackupExpiresAt1765400000000 } from "./1765400000000-drop-backup-expires-at";
import { NbdExports1765500000000 } from "./1765500000000-nbd-exports";
import { NbdJournal1765600000000 } from "./1765600000000-nbd-journal";
import { VaultExports1765700000000 } from "./1765700000000-vault-exports";
import { Clones1765800000000 } from "./1765800000000-clones";
import { InstantRestore1765900000000 } from "./1765900000000-instant-restore";

/** Every migration, in order. Listed explicitly so the same set runs under ts-node, jest and the build. */
export const migrations = [
  Initial1764000000000,
  DataPlane1764100000000,
  Images1764200000000,
  PolicyRuns1764300000000,
  FailuresAndWork1765000000000,
  SegmentLiveBlocks1765100000000,
  StagedRestores1765200000000,
  PendingBlobs1765300000000,
  DropBackupExpiresAt1765400000000,
  NbdExports1765500000000,
  NbdJournal1765600000000,
  VaultExports1765700000000,
  Clones1765800000000,
  InstantRestore1765900000000,
];
