import type { Project } from "../entities";
import type { RequestContext } from "../services/context";
import type { Services } from "../services";

/** What every resolver receives: the request context plus the services to hand it to. */
export interface GraphQLContext {
  ctx: RequestContext;
  project: Project;
  services: Services;
}
