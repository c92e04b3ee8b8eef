//! `ptune.v1.JobService`: decode, call [`Jobs`], encode.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use ptune_proto::v1::{self, job_service_server::JobService};
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use super::convert;
use crate::auth::layer::identity;
use crate::jobs::Jobs;
use crate::limits::StreamLimits;

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC face of [`Jobs`].
pub struct JobApi {
    jobs: Jobs,
    streams: StreamLimits,
    /// Longest wait for an upload's next message.
    upload_idle: std::time::Duration,
}

impl JobApi {
    pub fn new(jobs: Jobs, streams: StreamLimits, upload_idle: std::time::Duration) -> Self {
        Self { jobs, streams, upload_idle }
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    #[instrument(skip_all)]
    async fn submit_job(&self, req: Request<v1::SubmitJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let caller = identity(&req)?;
        let (spec, default_attempts) = convert::job_spec(req.into_inner().spec)?;
        let job = self.jobs.submit(spec, default_attempts, &caller).await?;
        Ok(Response::new(v1::SubmitJobResponse { job: Some(convert::job_report(&job)) }))
    }

    #[instrument(skip_all, fields(specs = req.get_ref().specs.len()))]
    async fn submit_jobs(&self, req: Request<v1::SubmitJobsRequest>) -> Result<Response<v1::SubmitJobsResponse>, Status> {
        let caller = identity(&req)?;
        let request = req.into_inner();
        let items = request.specs.into_iter().map(|spec| convert::job_spec(Some(spec))).collect();
        let results = self.jobs.submit_many(items, request.all_or_nothing, &caller).await?;
        let submitted = results.iter().filter(|r| r.is_ok()).count() as u32;
        Ok(Response::new(v1::SubmitJobsResponse {
            results: results.into_iter().map(convert::submit_result).collect(),
            submitted,
        }))
    }

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        let scope = identity(&req)?.scope();
        let id = convert::job_id(&req.into_inner().job_id, "job_id")?;
        let job = self.jobs.get(id, &scope).await?;
        Ok(Response::new(convert::job_report(&job)))
    }

    #[instrument(skip_all)]
    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let scope = identity(&req)?.scope();
        let (filter, page_size, after) = convert::list_query(req.into_inner())?;
        let page = self.jobs.list(&filter, page_size, after, &scope).await?;
        Ok(Response::new(v1::ListJobsResponse {
            jobs: page.jobs.iter().map(convert::job_report).collect(),
            next_page_token: page.next.map(|c| c.encode(&filter.listing())).unwrap_or_default(),
        }))
    }

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::Job>, Status> {
        let caller = identity(&req)?;
        let id = convert::job_id(&req.into_inner().job_id, "job_id")?;
        let job = self.jobs.cancel(id, &caller).await?;
        Ok(Response::new(convert::job_report(&job)))
    }

    type WatchJobStream = EventStream<v1::JobEvent>;

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn watch_job(&self, req: Request<v1::WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = identity(&req)?;
        let id = convert::job_id(&req.into_inner().job_id, "job_id")?;
        let permit = self.streams.acquire(&caller, "WatchJob")?;
        let events = self.jobs.watch(id, &caller.scope()).await?;
        // The stream holds its place until it ends or its client goes away.
        let stream = events.map(move |e| {
            let _held = &permit;
            e.map(convert::job_event).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn get_metrics(
        &self,
        req: Request<v1::GetMetricsRequest>,
    ) -> Result<Response<v1::GetMetricsResponse>, Status> {
        let scope = identity(&req)?.scope();
        let req = req.into_inner();
        let id = convert::job_id(&req.job_id, "job_id")?;
        let metrics = self.jobs.metrics(id, convert::metric_kind(&req.kind)?, &scope).await?;
        Ok(Response::new(v1::GetMetricsResponse { metrics: metrics.iter().map(v1::Metric::from).collect() }))
    }

    type DownloadAdapterStream = EventStream<v1::AdapterChunk>;

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id))]
    async fn download_adapter(
        &self,
        req: Request<v1::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        let caller = identity(&req)?;
        let id = convert::job_id(&req.into_inner().job_id, "job_id")?;
        let (info, chunks) = self.jobs.adapter(id, &caller, None).await?;
        let stream = chunks.enumerate().map(move |(i, data)| {
            let first = i == 0;
            Ok(v1::AdapterChunk {
                sha256: if first { info.sha256.clone() } else { String::new() },
                total_size: if first { info.size } else { 0 },
                data: data?,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all)]
    async fn list_workers(
        &self,
        req: Request<v1::ListWorkersRequest>,
    ) -> Result<Response<v1::ListWorkersResponse>, Status> {
        let workers = self.jobs.workers(req.into_inner().page_size).await?;
        Ok(Response::new(v1::ListWorkersResponse { workers: workers.iter().map(convert::worker_info).collect() }))
    }

    #[instrument(skip_all)]
    async fn upload_dataset(
        &self,
        req: Request<Streaming<v1::DatasetChunk>>,
    ) -> Result<Response<v1::DatasetInfo>, Status> {
        let mut chunks = req.into_inner();
        let mut upload = self.jobs.begin_dataset().await?;
        while let Some(chunk) = super::next_message(&mut chunks, self.upload_idle).await? {
            upload.push(&chunk.file_name, &chunk.data).await?;
        }
        let info = self.jobs.store_dataset(upload).await?;
        Ok(Response::new(convert::dataset_info(&info)))
    }
}
