import crypto from "node:crypto";
import { createLogger } from "../../src/logger";
import { fromGlobalId, toGlobalId } from "../../src/services/global-id";

function logged(level: "debug" | "info" | "warn" | "error", fields: Record<string, unknown>, threshold: "debug" | "info" | "warn" | "error" = "debug") {
  const lines: string[] = [];
  createLogger(threshold, (l) => lines.push(l))[level]("something happened", fields);
  return lines.map((l) => JSON.parse(l));
}

describe("logger", () => {
  it("writes each resource key's row id as the global ID of its type", () => {
    const id = crypto.randomUUID();
    const keys = { job: "Job", backup: "Backup", disk: "Disk", server: "Server", image: "Image", export: "ImageExport", policy: "Policy", project: "Project" };
    const [line] = logged("info", Object.fromEntries(Object.keys(keys).map((k) => [k, id])));
    for (const [key, type] of Object.entries(keys)) expect([key, fromGlobalId(line[key])]).toEqual([key, { type, id }]);
    expect(JSON.stringify(line)).not.toContain(id);
  });

  it("leaves global IDs, other keys and missing resources as they are", () => {
    const id = crypto.randomUUID();
    const job = toGlobalId("Job", id);
    const [line] = logged("warn", { job, disk: undefined, backup: null, upload: id, bytes: 5 });
    expect(line).toEqual({ time: expect.any(String), level: "warn", msg: "something happened", job, backup: null, upload: id, bytes: 5 });
  });

  it("writes an error's name, message and stack, and drops lines below the level", () => {
    const [line] = logged("error", { error: new TypeError("boom") });
    expect(line.error).toMatchObject({ name: "TypeError", message: "boom", stack: expect.stringMatching(/^TypeError: boom\n\s+at /) });
    expect(logged("info", { job: "x" }, "warn")).toEqual([]);
  });
});
