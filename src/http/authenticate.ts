import type { RequestHandler } from "express";
import type { Project } from "../entities";
import type { ProjectService } from "../services/project.service";
import { unauthenticated } from "../domain/errors";

declare module "express-serve-static-core" {
  interface Request {
    project?: Project;
  }
}

/** Puts the project of the request's API key on `req.project`, or refuses the request UNAUTHENTICATED. */
export function authenticator(projects: ProjectService): RequestHandler {
  return async (req, _res, next) => {
    try {
      const project = await projects.authenticate(req.headers.authorization);
      if (!project) return next(unauthenticated());
      req.project = project;
      next();
    } catch (err) {
      next(err);
    }
  };
}
