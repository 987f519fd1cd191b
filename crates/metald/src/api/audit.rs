//! Mutating calls: each runs in a task of its own, so a client that hangs up (or a deadline
//! that passes) never cancels it half-way, and each writes one audit event when it ends: who
//! (customer, token subject, service identity, peer), what (method, VM), the outcome and the
//! request id. Audit events are JSON log lines with `target` `metald::audit`.

use std::future::Future;
use std::sync::Arc;

use connectrpc::ConnectError;
use tracing::Instrument;

use super::auth::Identity;
use super::error::to_connect;
use crate::domain::{VmId, VmRecord};
use crate::service::ServiceError;

/// A result that names the VM it is about (a create's VM is known only at the end).
pub trait Audited {
    /// The VM, if the result names one.
    fn audited_vm(&self) -> Option<&VmId>;
}

impl Audited for VmRecord {
    fn audited_vm(&self) -> Option<&VmId> {
        Some(&self.id)
    }
}

impl Audited for crate::store::SnapshotRecord {
    fn audited_vm(&self) -> Option<&VmId> {
        Some(&self.source_vm)
    }
}

impl Audited for () {
    fn audited_vm(&self) -> Option<&VmId> {
        None
    }
}

/// Runs `work` to completion in its own task and audits it as `method` on `vm`.
pub async fn effect<T, F>(
    who: &Arc<Identity>,
    method: &'static str,
    vm: Option<VmId>,
    work: F,
) -> Result<T, ConnectError>
where
    T: Audited + Send + 'static,
    F: Future<Output = Result<T, ServiceError>> + Send + 'static,
{
    let id = Arc::clone(who);
    let task = async move {
        let who = id;
        match work.await {
            Ok(v) => {
                record(&who, method, vm.as_ref().or_else(|| v.audited_vm()), "ok");
                Ok(v)
            }
            Err(e) => {
                let e = to_connect(&e);
                record(&who, method, vm.as_ref(), e.code.as_str());
                Err(e)
            }
        }
    };
    match tokio::spawn(task.instrument(tracing::Span::current())).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(method, error = %e, "API task failed");
            record(who, method, None, "internal");
            Err(ConnectError::internal(format!(
                "internal error (request id {})",
                crate::telemetry::request_id()
            )))
        }
    }
}

/// Writes one audit event.
fn record(who: &Identity, method: &'static str, vm: Option<&VmId>, outcome: &str) {
    tracing::info!(
        target: "metald::audit",
        method,
        customer = %who.customer,
        subject = who.subject.as_deref().unwrap_or(""),
        service = who.service.as_deref().unwrap_or(""),
        peer = %who.peer.map(|p| p.to_string()).unwrap_or_default(),
        vm_id = %vm.map(ToString::to_string).unwrap_or_default(),
        outcome,
        request_id = %crate::telemetry::request_id(),
        "audit"
    );
}
