import { registerEnumType } from "type-graphql";
import {
  BackupResourceType,
  BackupStatus,
  BackupTrigger,
  DiskFormat,
  DiskStatus,
  DiskType,
  ExportStatus,
  ImageSource,
  ImageStatus,
  ImageType,
  JobStatus,
  JobType,
  OsType,
  ServerStatus,
} from "../../entities/enums";

export enum OrderField {
  CREATED_AT = "CREATED_AT",
  NAME = "NAME",
}
export enum TimeOrderField {
  CREATED_AT = "CREATED_AT",
}
export enum OrderDirection {
  ASC = "ASC",
  DESC = "DESC",
}

const enums = {
  ServerStatus,
  OsType,
  DiskType,
  DiskStatus,
  BackupResourceType,
  BackupStatus,
  BackupTrigger,
  ImageType,
  ImageStatus,
  ImageSource,
  DiskFormat,
  ExportStatus,
  JobStatus,
  JobType,
  OrderField,
  TimeOrderField,
  OrderDirection,
};
for (const [name, e] of Object.entries(enums)) registerEnumType(e, { name });

export { BackupResourceType, BackupStatus, BackupTrigger, DiskFormat, DiskStatus, DiskType, ExportStatus, ImageSource, ImageStatus, ImageType, JobStatus, JobType, OsType, ServerStatus };
