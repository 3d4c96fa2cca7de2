import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import type { StowageProcess } from "./stowage";

/**
 * Streaming file transfers to and from a running Stowage (the image benchmark):
 * POST /v1/uploads from a file, GET an export's file into a file. Memory stays at
 * the streams' buffers whatever the file's size.
 */

export interface Upload {
  id: string;
  sizeBytes: number;
  sha256: string;
}

/** POST /v1/uploads with the file as the body; resolves with the 201 answer. */
export function uploadFile(svc: StowageProcess, file: string): Promise<Upload> {
  const size = fs.statSync(file).size;
  return new Promise((resolve, reject) => {
    const u = new URL(`${svc.url}/v1/uploads`);
    const req = http.request(
      {
        method: "POST",
        hostname: u.hostname,
        port: u.port,
        path: u.pathname,
        headers: { authorization: `Bearer ${svc.key}`, "content-type": "application/octet-stream", "content-length": String(size) },
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d) => (text += d));
        res.on("end", () => {
          if (res.statusCode !== 201) return reject(new Error(`POST /v1/uploads: ${res.statusCode} ${text.slice(0, 2000)}`));
          try {
            resolve(JSON.parse(text) as Upload);
          } catch (err) {
            reject(err);
          }
        });
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    const body = fs.createReadStream(file, { highWaterMark: 1024 * 1024 });
    body.on("error", (err) => req.destroy(err));
    body.pipe(req);
  });
}

/** GET `pathOrUrl` (e.g. an export's downloadUrl) into `dest`; returns its length and SHA-256. */
export function downloadFile(svc: StowageProcess, pathOrUrl: string, dest: string): Promise<{ bytes: number; sha256: string }> {
  return new Promise((resolve, reject) => {
    const u = new URL(pathOrUrl, svc.url);
    const req = http.get({ hostname: u.hostname, port: u.port, path: u.pathname + u.search, headers: { authorization: `Bearer ${svc.key}` } }, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        return reject(new Error(`GET ${u.pathname}: ${res.statusCode}`));
      }
      const hash = crypto.createHash("sha256");
      let bytes = 0;
      const out = fs.createWriteStream(dest);
      res.on("data", (d: Buffer) => {
        hash.update(d);
        bytes += d.length;
      });
      res.on("error", reject);
      out.on("error", reject);
      out.on("finish", () => (res.complete ? resolve({ bytes, sha256: hash.digest("hex") }) : reject(new Error(`GET ${u.pathname}: the response ended early`))));
      res.pipe(out);
    });
    req.on("error", reject);
  });
}
