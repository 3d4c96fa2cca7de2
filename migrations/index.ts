import { Initial1764000000000 } from "./1764000000000-initial";

/** Every migration, in order. Listed explicitly so the same set runs under ts-node, jest and the build. */
export const migrations = [Initial1764000000000];
