import fs from "node:fs";
import path from "node:path";
import { printStowageSchema } from "../../src/graphql/schema";

describe("schema/schema.graphql", () => {
  it("matches the schema the code emits (run `npm run schema -- --write` after a change)", () => {
    const checkedIn = fs.readFileSync(path.join(__dirname, "..", "..", "schema", "schema.graphql"), "utf8");
    expect(checkedIn).toBe(printStowageSchema());
  });

  it("names the DESIGN contract's types and operations", () => {
    const sdl = printStowageSchema();
    for (const name of [
      "interface Node",
      "type Server implements Node",
      "type Disk implements Node",
      "type Backup implements Node",
      "type Image implements Node",
      "type ImageExport implements Node",
      "type Policy implements Node",
      "type Job implements Node",
      "scalar SafeInt",
      "scalar DateTime",
    ]) {
      expect(sdl).toContain(name);
    }
    for (const op of [
      "node(id: ID!): Node",
      "nodes(ids: [ID!]!): [Node]!",
      "servers(",
      "disks(",
      "backups(",
      "images(",
      "policies(",
      "jobs(",
      "viewer: Project!",
      "createServer(input: CreateServerInput!): CreateServerPayload!",
      "deleteServer(input: DeleteServerInput!)",
      "attachDisk(input: AttachDiskInput!)",
      "bindPolicy(input: BindPolicyInput!)",
    ]) {
      expect(sdl).toContain(op);
    }
  });
});
