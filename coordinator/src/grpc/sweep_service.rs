//! `ptune.v1.SweepService`: decode, call [`Sweeps`], encode.

use ptune_proto::v1::{self, sweep_service_server::SweepService};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::convert;
use crate::auth::layer::identity;
use crate::sweep::Sweeps;

/// The gRPC face of [`Sweeps`].
pub struct SweepApi {
    sweeps: Sweeps,
}

impl SweepApi {
    pub fn new(sweeps: Sweeps) -> Self {
        Self { sweeps }
    }
}

#[tonic::async_trait]
impl SweepService for SweepApi {
    #[instrument(skip_all)]
    async fn create_sweep(&self, req: Request<v1::CreateSweepRequest>) -> Result<Response<v1::Sweep>, Status> {
        let caller = identity(&req)?;
        let definition = convert::sweep_definition(&req.into_inner().definition_json)?;
        let report = self.sweeps.create(definition, &caller).await?;
        Ok(Response::new(convert::sweep(&report, true)))
    }

    #[instrument(skip_all, fields(sweep_id = %req.get_ref().sweep_id))]
    async fn get_sweep(&self, req: Request<v1::GetSweepRequest>) -> Result<Response<v1::Sweep>, Status> {
        let scope = identity(&req)?.scope();
        let id = convert::sweep_id(&req.into_inner().sweep_id)?;
        let report = self.sweeps.get(id, &scope).await?;
        Ok(Response::new(convert::sweep(&report, true)))
    }

    #[instrument(skip_all)]
    async fn list_sweeps(
        &self,
        req: Request<v1::ListSweepsRequest>,
    ) -> Result<Response<v1::ListSweepsResponse>, Status> {
        let scope = identity(&req)?.scope();
        let (states, page_size, after) = convert::sweep_list_query(req.into_inner())?;
        let page = self.sweeps.list(&states, page_size, after, &scope).await?;
        Ok(Response::new(v1::ListSweepsResponse {
            sweeps: page.sweeps.iter().map(|(sweep, best)| convert::sweep_summary(sweep, best.as_ref())).collect(),
            next_page_token: page.next.map(|t| t.to_string()).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(sweep_id = %req.get_ref().sweep_id))]
    async fn cancel_sweep(&self, req: Request<v1::CancelSweepRequest>) -> Result<Response<v1::Sweep>, Status> {
        let caller = identity(&req)?;
        let id = convert::sweep_id(&req.into_inner().sweep_id)?;
        let report = self.sweeps.cancel(id, &caller).await?;
        Ok(Response::new(convert::sweep(&report, true)))
    }

    #[instrument(skip_all, fields(sweep_id = %req.get_ref().sweep_id))]
    async fn extend_sweep(&self, req: Request<v1::ExtendSweepRequest>) -> Result<Response<v1::Sweep>, Status> {
        let caller = identity(&req)?;
        let req = req.into_inner();
        let id = convert::sweep_id(&req.sweep_id)?;
        let report = self.sweeps.extend(id, req.trials, &caller).await?;
        Ok(Response::new(convert::sweep(&report, true)))
    }

    #[instrument(skip_all, fields(sweep_id = %req.get_ref().sweep_id))]
    async fn update_sweep(&self, req: Request<v1::UpdateSweepRequest>) -> Result<Response<v1::Sweep>, Status> {
        let caller = identity(&req)?;
        let req = req.into_inner();
        let id = convert::sweep_id(&req.sweep_id)?;
        let report = self.sweeps.set_max_concurrent_trials(id, req.max_concurrent_trials, &caller).await?;
        Ok(Response::new(convert::sweep(&report, true)))
    }
}
