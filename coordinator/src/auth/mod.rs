//! Who may do what. Every gRPC call and HTTP route is authenticated by a
//! bearer token (an API key an admin created; see [`tokens`]) and checked
//! against [`permission`], the one table of what each call needs, by
//! [`layer::AuthLayer`] (gRPC) and the dashboard's middleware (HTTP). The
//! caller's [`Identity`] rides in the request's extensions; the domain
//! narrows what a submitter sees to its own jobs and sweeps with [`Scope`].
//!
//! Roles:
//! - `admin`: everything, tokens and the audit trail included;
//! - `submitter`: submits jobs and sweeps, uploads datasets, and sees,
//!   watches, cancels and downloads its own jobs, sweeps and adapters;
//! - `viewer`: reads everything (ops dashboards), changes nothing;
//! - `worker`: the worker service only.

pub mod layer;
pub mod tokens;

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

/// A token's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Submitter,
    Viewer,
    Worker,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Submitter, Role::Viewer, Role::Worker];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Submitter => "submitter",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    /// Whether the role may make a call that needs `permission`.
    pub fn allows(self, permission: Permission) -> bool {
        match permission {
            Permission::Public => true,
            Permission::Authenticated => true,
            Permission::ReadOwn => matches!(self, Role::Admin | Role::Submitter | Role::Viewer),
            Permission::WriteOwn => matches!(self, Role::Admin | Role::Submitter),
            Permission::ReadFleet => matches!(self, Role::Admin | Role::Viewer),
            Permission::Work => matches!(self, Role::Admin | Role::Worker),
            Permission::Admin => self == Role::Admin,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| format!("unknown role {s:?}; allowed: admin, submitter, viewer, worker"))
    }
}

/// What a call needs of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// Nothing: liveness and readiness (gRPC health, `/healthz`).
    Public,
    /// Any valid token (reflection, the dashboard's shell).
    Authenticated,
    /// Reading jobs, sweeps and adapters: a submitter its own, viewers and admins all.
    ReadOwn,
    /// Submitting, uploading, cancelling and changing: a submitter its own, admins all.
    WriteOwn,
    /// Reading the fleet (workers): viewers and admins.
    ReadFleet,
    /// The worker service: workers (and admins).
    Work,
    /// Tokens and the audit trail.
    Admin,
}

impl Permission {
    /// The roles that have it, for refusal messages.
    pub fn roles(self) -> String {
        let roles: Vec<&str> = Role::ALL.into_iter().filter(|r| r.allows(self)).map(Role::as_str).collect();
        roles.join(" or ")
    }
}

/// What each gRPC method needs: the one table, read by [`layer::AuthLayer`]
/// and by the metrics layer (which labels only the methods listed here).
/// `None` for a path that is no method of the server.
pub fn permission(path: &str) -> Option<Permission> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    Some(match (service, method) {
        ("grpc.health.v1.Health", "Check" | "Watch") => Permission::Public,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo") => {
            Permission::Authenticated
        }
        ("ptune.v1.JobService", "SubmitJob" | "SubmitJobs" | "CancelJob" | "UploadDataset") => Permission::WriteOwn,
        ("ptune.v1.JobService", "GetJob" | "ListJobs" | "WatchJob" | "GetMetrics" | "DownloadAdapter") => {
            Permission::ReadOwn
        }
        ("ptune.v1.JobService", "ListWorkers") => Permission::ReadFleet,
        ("ptune.v1.SweepService", "CreateSweep" | "CancelSweep" | "ExtendSweep" | "UpdateSweep") => {
            Permission::WriteOwn
        }
        ("ptune.v1.SweepService", "GetSweep" | "ListSweeps") => Permission::ReadOwn,
        (
            "ptune.v1.WorkerService",
            "RegisterWorker" | "Heartbeat" | "LeaseJob" | "ReportProgress" | "ReportProgressBatch" | "CompleteJob"
            | "FailJob" | "DownloadDataset" | "ReleaseJob" | "UploadCheckpoint" | "DownloadCheckpoint",
        ) => Permission::Work,
        ("ptune.v1.AdminService", "CreateToken" | "ListTokens" | "RevokeToken" | "ListAudit") => Permission::Admin,
        _ => return None,
    })
}

/// The caller of a request, as its token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub token_id: Uuid,
    /// The token's name: the owner of what it submits.
    pub name: String,
    pub role: Role,
}

impl Identity {
    /// Which jobs and sweeps the caller may see and change: its own for a
    /// submitter, all for the other roles.
    pub fn scope(&self) -> Scope {
        match self.role {
            Role::Submitter => Scope::Owner(self.name.clone()),
            _ => Scope::All,
        }
    }
}

/// Which jobs and sweeps a call may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    /// Only those this owner submitted.
    Owner(String),
}

impl Scope {
    /// Whether a job or sweep of `owner` is visible.
    pub fn sees(&self, owner: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Owner(me) => me == owner,
        }
    }

    /// The owner to filter listings by, if any.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Owner(me) => Some(me),
        }
    }
}

/// The identity of in-process calls the coordinator makes for itself
/// (the sweep engine creating trials, tests of the domain).
pub fn system() -> Identity {
    Identity { token_id: Uuid::nil(), name: "ptune-system".into(), role: Role::Admin }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_gets_exactly_its_calls() {
        let can = |role: Role, path: &str| permission(path).is_some_and(|p| role.allows(p));
        assert!(can(Role::Submitter, "/ptune.v1.JobService/SubmitJob"));
        assert!(!can(Role::Submitter, "/ptune.v1.JobService/ListWorkers"));
        assert!(!can(Role::Submitter, "/ptune.v1.WorkerService/LeaseJob"));
        assert!(can(Role::Viewer, "/ptune.v1.JobService/ListJobs") && can(Role::Viewer, "/ptune.v1.JobService/ListWorkers"));
        assert!(!can(Role::Viewer, "/ptune.v1.JobService/CancelJob") && !can(Role::Viewer, "/ptune.v1.SweepService/CreateSweep"));
        assert!(can(Role::Worker, "/ptune.v1.WorkerService/CompleteJob"));
        assert!(!can(Role::Worker, "/ptune.v1.JobService/CancelJob") && !can(Role::Worker, "/ptune.v1.JobService/DownloadAdapter"));
        assert!(!can(Role::Submitter, "/ptune.v1.AdminService/CreateToken") && can(Role::Admin, "/ptune.v1.AdminService/CreateToken"));
        assert_eq!(permission("/ptune.v1.JobService/NoSuchMethod"), None);
        assert_eq!(permission("/ptune.v1.WorkerService/NoSuchMethod"), None);
        assert_eq!(permission("/grpc.health.v1.Health/Probe"), None);
        assert_eq!(permission("/grpc.health.v1.Health/Check"), Some(Permission::Public));
        assert_eq!(Permission::WriteOwn.roles(), "admin or submitter");
    }

    #[test]
    fn a_submitter_sees_only_its_own() {
        let me = Identity { token_id: Uuid::nil(), name: "ada".into(), role: Role::Submitter };
        assert!(me.scope().sees("ada") && !me.scope().sees("bob"));
        let viewer = Identity { role: Role::Viewer, ..me };
        assert!(viewer.scope().sees("bob"));
    }
}
