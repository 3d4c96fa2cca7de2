import { Field, ID, ObjectType } from "type-graphql";
import { DiskType_, PolicyType, ServerType } from "./resources.type";

@ObjectType()
export class CreateServerPayload {
  @Field(() => ServerType) server: unknown;
}

@ObjectType()
export class ServerPayload {
  @Field(() => ServerType) server: unknown;
}

@ObjectType()
export class DeleteServerPayload {
  @Field(() => ID) deletedServerId: string;
  @Field(() => [ID]) deletedDiskIds: string[];
  @Field(() => [ID], { description: "Data disks that were detached and kept." }) detachedDiskIds: string[];
}

@ObjectType()
export class DiskPayload {
  @Field(() => DiskType_) disk: unknown;
}

@ObjectType()
export class AttachmentPayload {
  @Field(() => DiskType_) disk: unknown;
  @Field(() => ServerType) server: unknown;
}

@ObjectType()
export class DeleteDiskPayload {
  @Field(() => ID) deletedDiskId: string;
}

@ObjectType()
export class PolicyPayload {
  @Field(() => PolicyType) policy: unknown;
}

@ObjectType()
export class DeletePolicyPayload {
  @Field(() => ID) deletedPolicyId: string;
}
