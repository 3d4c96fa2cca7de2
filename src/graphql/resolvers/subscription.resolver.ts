import { Arg, Field, Float, ID, Int, ObjectType, Root, Resolver, Subscription } from "type-graphql";
import type { Job } from "../../entities";
import type { GraphQLContext } from "../context";
import { JobStatus } from "../types/enums";
import { JobFilter } from "../types/inputs.type";
import { JobType_ } from "../types/resources.type";
import { SafeInt } from "../types/scalars";

@ObjectType("ProgressEvent", { simpleResolvers: true, description: "A job's progress at one moment." })
export class ProgressEventType {
  @Field(() => JobType_) job: Job;
  @Field(() => Float, { description: "0 to 1." }) progress: number;
  @Field(() => SafeInt) bytesDone: number;
  @Field(() => SafeInt) bytesTotal: number;
  @Field(() => JobStatus) status: JobStatus;
  @Field(() => Int, { nullable: true }) etaSeconds: number | null;
}

type SubscribeData = { args: Record<string, unknown>; context: GraphQLContext };

@Resolver()
export class SubscriptionResolver {
  @Subscription(() => ProgressEventType, {
    description: "The job's progress now, on every change, and its terminal state; then the subscription completes.",
    subscribe: ({ args, context }: SubscribeData) => context.services.progress.job(context.ctx, args.jobId as string),
  })
  jobProgress(@Root() event: ProgressEventType, @Arg("jobId", () => ID) _jobId: string): ProgressEventType {
    return event;
  }

  @Subscription(() => ProgressEventType, {
    description: "Progress of the job acting on a backup (taking, restoring, verifying or deleting it) until that job ends.",
    subscribe: ({ args, context }: SubscribeData) => context.services.progress.backup(context.ctx, args.backupId as string),
  })
  backupProgress(@Root() event: ProgressEventType, @Arg("backupId", () => ID) _backupId: string): ProgressEventType {
    return event;
  }

  @Subscription(() => JobType_, {
    description: "Every change of every job of the project that matches the filter.",
    subscribe: ({ args, context }: SubscribeData) => context.services.progress.updates(context.ctx, args.filter as JobFilter | undefined),
  })
  jobUpdated(@Root() job: Job, @Arg("filter", () => JobFilter, { nullable: true }) _filter?: JobFilter): Job {
    return job;
  }
}
