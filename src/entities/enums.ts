export enum ServerStatus {
  BUILDING = "BUILDING",
  ACTIVE = "ACTIVE",
  SHUTOFF = "SHUTOFF",
  RESTORING = "RESTORING",
  ERROR = "ERROR",
}
export enum OsType {
  LINUX = "LINUX",
  WINDOWS = "WINDOWS",
  OTHER = "OTHER",
}
export enum DiskType {
  SYSTEM = "SYSTEM",
  DATA = "DATA",
}
export enum DiskStatus {
  CREATING = "CREATING",
  AVAILABLE = "AVAILABLE",
  IN_USE = "IN_USE",
  RESTORING = "RESTORING",
  ERROR = "ERROR",
}
export enum BackupResourceType {
  SERVER = "SERVER",
  DISK = "DISK",
}
export enum BackupStatus {
  CREATING = "CREATING",
  AVAILABLE = "AVAILABLE",
  RESTORING = "RESTORING",
  DELETING = "DELETING",
  ERROR = "ERROR",
}
export enum BackupTrigger {
  MANUAL = "MANUAL",
  POLICY = "POLICY",
}
export enum ImageType {
  SYSTEM_DISK = "SYSTEM_DISK",
  DATA_DISK = "DATA_DISK",
  FULL_SERVER = "FULL_SERVER",
}
export enum ImageStatus {
  QUEUED = "QUEUED",
  SAVING = "SAVING",
  ACTIVE = "ACTIVE",
  KILLED = "KILLED",
}
export enum ImageSource {
  SERVER = "SERVER",
  DISK = "DISK",
  BACKUP = "BACKUP",
  IMPORT = "IMPORT",
}
export enum DiskFormat {
  RAW = "RAW",
  QCOW2 = "QCOW2",
  VMDK = "VMDK",
  VHD = "VHD",
}
export enum ExportStatus {
  QUEUED = "QUEUED",
  RUNNING = "RUNNING",
  READY = "READY",
  FAILED = "FAILED",
  EXPIRED = "EXPIRED",
}
export enum JobStatus {
  QUEUED = "QUEUED",
  RUNNING = "RUNNING",
  SUCCEEDED = "SUCCEEDED",
  FAILED = "FAILED",
  CANCELLED = "CANCELLED",
}
export enum JobType {
  BACKUP = "BACKUP",
  RESTORE = "RESTORE",
  CREATE_IMAGE = "CREATE_IMAGE",
  IMPORT_IMAGE = "IMPORT_IMAGE",
  EXPORT_IMAGE = "EXPORT_IMAGE",
  CREATE_DISK = "CREATE_DISK",
  DELETE_BACKUP = "DELETE_BACKUP",
  VERIFY_BACKUP = "VERIFY_BACKUP",
}
