//! The ConnectRPC adapter: `metald.v1.VmService` over Connect (JSON and protobuf) and gRPC.

use std::sync::Arc;

use connectrpc::{ConnectError, RequestContext, Response, ServiceRequest, ServiceResult};
use metald_proto::metald::v1 as pb;

use super::auth::{Caller, Identity};
use super::forward::Peers;
use super::handlers as h;
use crate::domain::CustomerId;
use crate::service::VmService;

/// Serves `metald.v1.VmService`.
pub struct ConnectApi {
    svc: Arc<VmService>,
    peers: Arc<Peers>,
}

impl ConnectApi {
    /// Wraps the lifecycle service; calls for VMs on other hosts go to `peers`.
    pub fn new(svc: Arc<VmService>, peers: Arc<Peers>) -> Self {
        Self { svc, peers }
    }
}

fn customer(ctx: &RequestContext) -> Result<CustomerId, ConnectError> {
    match ctx.extensions().get::<Caller>() {
        Some(caller) => caller.customer().cloned(),
        // The auth layer wraps every route; reaching here without it is a wiring bug.
        None => Err(ConnectError::unauthenticated("no credentials were checked")),
    }
}

fn identity(ctx: &RequestContext) -> Result<Arc<Identity>, ConnectError> {
    match ctx.extensions().get::<Caller>() {
        Some(caller) => caller.identity().cloned(),
        None => Err(ConnectError::unauthenticated("no credentials were checked")),
    }
}

// Returning the concrete response types is simpler than the trait's `impl Encodable`.
#[allow(refining_impl_trait)]
impl pb::VmService for ConnectApi {
    async fn create_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateVmRequest>,
    ) -> ServiceResult<pb::CreateVmResponse> {
        let who = identity(&ctx)?;
        Response::ok(h::create_vm(&self.svc, &self.peers, &who, request.to_owned_message()).await?)
    }

    async fn boot_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::BootVmRequest>,
    ) -> ServiceResult<pb::BootVmResponse> {
        let who = identity(&ctx)?;
        let vm = h::boot_vm(&self.svc, &self.peers, &who, request.vm_id).await?;
        Response::ok(pb::BootVmResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn shutdown_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ShutdownVmRequest>,
    ) -> ServiceResult<pb::ShutdownVmResponse> {
        let who = identity(&ctx)?;
        let vm = h::shutdown_vm(
            &self.svc,
            &self.peers,
            &who,
            request.vm_id,
            request.force,
            request.timeout_seconds,
        )
        .await?;
        Response::ok(pb::ShutdownVmResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn pause_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::PauseVmRequest>,
    ) -> ServiceResult<pb::PauseVmResponse> {
        let who = identity(&ctx)?;
        let vm = h::pause_vm(&self.svc, &self.peers, &who, request.vm_id).await?;
        Response::ok(pb::PauseVmResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn resume_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ResumeVmRequest>,
    ) -> ServiceResult<pb::ResumeVmResponse> {
        let who = identity(&ctx)?;
        let vm = h::resume_vm(&self.svc, &self.peers, &who, request.vm_id).await?;
        Response::ok(pb::ResumeVmResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn suspend_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::SuspendVmRequest>,
    ) -> ServiceResult<pb::SuspendVmResponse> {
        let who = identity(&ctx)?;
        let vm = h::suspend_vm(&self.svc, &self.peers, &who, request.vm_id).await?;
        Response::ok(pb::SuspendVmResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn reboot_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::RebootVmRequest>,
    ) -> ServiceResult<pb::RebootVmResponse> {
        let who = identity(&ctx)?;
        let vm = h::reboot_vm(&self.svc, &self.peers, &who, request.vm_id, request.force).await?;
        Response::ok(pb::RebootVmResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn delete_vm(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::DeleteVmRequest>,
    ) -> ServiceResult<pb::DeleteVmResponse> {
        let who = identity(&ctx)?;
        h::delete_vm(&self.svc, &self.peers, &who, request.vm_id, request.force).await?;
        Response::ok(pb::DeleteVmResponse::default())
    }

    async fn get_vm_info(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetVmInfoRequest>,
    ) -> ServiceResult<pb::GetVmInfoResponse> {
        let who = identity(&ctx)?;
        let vm = h::get_vm(&self.svc, &who, request.vm_id).await?;
        Response::ok(pb::GetVmInfoResponse {
            vm: vm.into(),
            ..Default::default()
        })
    }

    async fn list_vms(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ListVmsRequest>,
    ) -> ServiceResult<pb::ListVmsResponse> {
        let who = identity(&ctx)?;
        let req = request.to_owned_message();
        let state = h::state_from_proto(&req.state_filter)?;
        Response::ok(h::list_vms(&self.svc, &who, state, req.page_size, &req.page_token).await?)
    }

    async fn get_vm_console(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetVmConsoleRequest>,
    ) -> ServiceResult<pb::GetVmConsoleResponse> {
        let who = identity(&ctx)?;
        Response::ok(
            h::get_console(
                &self.svc,
                &self.peers,
                &who,
                request.vm_id,
                request.tail_bytes,
            )
            .await?,
        )
    }

    async fn get_vm_usage(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::GetVmUsageRequest>,
    ) -> ServiceResult<pb::GetVmUsageResponse> {
        let who = identity(&ctx)?;
        Response::ok(
            h::get_usage(&self.svc, &self.peers, &who, request.vm_id, request.since).await?,
        )
    }

    async fn list_customer_usage(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::ListCustomerUsageRequest>,
    ) -> ServiceResult<pb::ListCustomerUsageResponse> {
        let who = identity(&ctx)?;
        Response::ok(
            h::list_customer_usage(&self.svc, &self.peers, &who, request.start, request.end)
                .await?,
        )
    }

    async fn create_snapshot(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::CreateSnapshotRequest>,
    ) -> ServiceResult<pb::CreateSnapshotResponse> {
        let who = identity(&ctx)?;
        Response::ok(h::create_snapshot(&self.svc, &self.peers, &who, request.vm_id).await?)
    }

    async fn list_snapshots(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, pb::ListSnapshotsRequest>,
    ) -> ServiceResult<pb::ListSnapshotsResponse> {
        let who = identity(&ctx)?;
        Response::ok(h::list_snapshots(&self.svc, &who).await?)
    }

    async fn delete_snapshot(
        &self,
        ctx: RequestContext,
        request: ServiceRequest<'_, pb::DeleteSnapshotRequest>,
    ) -> ServiceResult<pb::DeleteSnapshotResponse> {
        let who = identity(&ctx)?;
        h::delete_snapshot(&self.svc, &self.peers, &who, request.snapshot_id).await?;
        Response::ok(pb::DeleteSnapshotResponse::default())
    }

    async fn get_host_capacity(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, pb::GetHostCapacityRequest>,
    ) -> ServiceResult<pb::GetHostCapacityResponse> {
        // The answer sums every customer's use, so api::auth admits only callers holding
        // host:read (operator tokens, trusted services, dev tokens).
        customer(&ctx)?;
        Response::ok(h::host_capacity(&self.svc).await?)
    }

    async fn get_fleet(
        &self,
        ctx: RequestContext,
        _request: ServiceRequest<'_, pb::GetFleetRequest>,
    ) -> ServiceResult<pb::GetFleetResponse> {
        // Names every host and its VM count: host:read only, as GetHostCapacity.
        customer(&ctx)?;
        Response::ok(h::fleet(&self.svc).await?)
    }
}
