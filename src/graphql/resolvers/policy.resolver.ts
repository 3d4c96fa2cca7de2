import { Arg, Args, Ctx, FieldResolver, Info, Mutation, Query, Resolver, Root } from "type-graphql";
import type { GraphQLResolveInfo } from "graphql";
import { listSelection, Reads } from "../selection";
import type { Policy } from "../../entities";
import { toGlobalId } from "../../services/global-id";
import type { GraphQLContext } from "../context";
import { BackupListArgs, BindPolicyInput, CreatePolicyInput, DiskListArgs, IdInput, PolicyListArgs, ServerListArgs, UpdatePolicyInput } from "../types/inputs.type";
import { DeletePolicyPayload, PolicyPayload } from "../types/payloads.type";
import { BackupConnection, DiskConnection, PolicyConnection, PolicyRunConnection, PolicyType, RetentionDecisionType, RetentionType, ServerConnection } from "../types/resources.type";
import { PageArgs } from "../types/connection";
import { RunPolicyPayload } from "../types/payloads.type";

@Resolver(() => PolicyType)
export class PolicyResolver {
  @Query(() => PolicyConnection)
  policies(@Args() args: PolicyListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.policies.list(ctx, "policies", ctx.projectId, args, listSelection(info));
  }

  @Mutation(() => PolicyPayload)
  async createPolicy(@Arg("input") input: CreatePolicyInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { policy: await services.policies.create(ctx, input) };
  }

  @Mutation(() => PolicyPayload)
  async updatePolicy(@Arg("input") input: UpdatePolicyInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { policy: await services.policies.update(ctx, input) };
  }

  @Mutation(() => DeletePolicyPayload, { description: "Deletes the policy and unbinds its resources; their backups stay." })
  async deletePolicy(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const policy = await services.policies.delete(ctx, input.id);
    return { deletedPolicyId: toGlobalId("Policy", policy.id) };
  }

  @Mutation(() => PolicyPayload, { description: "Binds servers and disks; each resource is bound to at most one policy." })
  async bindPolicy(@Arg("input") input: BindPolicyInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { policy: await services.policies.bind(ctx, input) };
  }

  @Mutation(() => PolicyPayload, { description: "Unbinds servers and disks; each must exist in your project (NOT_FOUND otherwise); one not bound to the policy stays as it is." })
  async unbindPolicy(@Arg("input") input: BindPolicyInput, @Ctx() { ctx, services }: GraphQLContext) {
    return { policy: await services.policies.unbind(ctx, input) };
  }

  @Mutation(() => RunPolicyPayload, { description: "Runs the policy now: backs its resources up, then applies retention." })
  async runPolicy(@Arg("input") input: IdInput, @Ctx() { ctx, services }: GraphQLContext) {
    const run = await services.policyRuns.runNow(ctx, input.id);
    return { run, policy: await services.policies.get(ctx, input.id) };
  }

  @FieldResolver(() => [RetentionDecisionType], { description: "What the next retention pass would keep and delete, and why." })
  retentionPreview(@Root() policy: Policy, @Ctx() { ctx, services }: GraphQLContext) {
    return services.policyRuns.preview(ctx, policy);
  }

  @Reads()
  @FieldResolver(() => PolicyRunConnection, { description: "The policy's runs, with what each skipped." })
  runs(@Root() policy: Policy, @Args() args: PageArgs, @Ctx() { ctx }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return ctx.loaders.connection("policyRuns", policy.id, args, [], listSelection(info));
  }

  @FieldResolver(() => RetentionType)
  retention(@Root() policy: Policy) {
    return policy;
  }

  @Reads()
  @FieldResolver(() => ServerConnection)
  servers(@Root() policy: Policy, @Args() args: ServerListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.servers.list(ctx, "policyServers", policy.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => DiskConnection)
  disks(@Root() policy: Policy, @Args() args: DiskListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.disks.list(ctx, "policyDisks", policy.id, args, listSelection(info));
  }

  @Reads()
  @FieldResolver(() => BackupConnection, { description: "Backups this policy made (server and disk backups, not their per-disk parts)." })
  backups(@Root() policy: Policy, @Args() args: BackupListArgs, @Ctx() { ctx, services }: GraphQLContext, @Info() info: GraphQLResolveInfo) {
    return services.backups.list(ctx, "policyBackups", policy.id, args, listSelection(info));
  }
}
