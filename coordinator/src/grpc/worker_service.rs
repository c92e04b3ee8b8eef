//! `ptune.v1.WorkerService`: decode, call [`Workers`], encode.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use ptune_proto::v1::{self, complete_job_chunk::Part, worker_service_server::WorkerService};
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use super::convert;
use crate::auth::layer::identity;
use crate::error::Error;
use crate::workers::Workers;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<v1::DatasetChunk, Status>> + Send + 'static>>;

/// The gRPC face of [`Workers`].
pub struct WorkerApi {
    workers: Workers,
    /// Longest wait for an upload's next message.
    upload_idle: std::time::Duration,
}

impl WorkerApi {
    pub fn new(workers: Workers, upload_idle: std::time::Duration) -> Self {
        Self { workers, upload_idle }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    #[instrument(skip_all, fields(worker_id = %req.get_ref().worker_id, hostname = %req.get_ref().hostname))]
    async fn register_worker(
        &self,
        req: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let caller = identity(&req)?;
        let reg = convert::registration(req.into_inner())?;
        let done = self.workers.register(reg, &caller).await?;
        Ok(Response::new(v1::RegisterWorkerResponse {
            worker_id: done.worker_id.to_string(),
            heartbeat_interval_ms: u32::try_from(done.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
            lease_timeout_ms: u32::try_from(done.lease_timeout.as_millis()).unwrap_or(u32::MAX),
            max_checkpoint_bytes: done.max_checkpoint_bytes,
        }))
    }

    #[instrument(skip_all, fields(worker_id = %req.get_ref().worker_id))]
    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let caller = identity(&req)?;
        let req = req.into_inner();
        let worker = convert::worker_id(&req.worker_id)?;
        let leases = convert::lease_refs(req.leases)?;
        let unhealthy = convert::unhealthy_reason(&req.unhealthy_reason)?;
        let reply = self.workers.heartbeat(worker, &leases, &unhealthy, &caller).await?;
        Ok(Response::new(v1::HeartbeatResponse {
            stop: convert::lease_refs_to_wire(&reply.stop),
            known: reply.known,
            early_stop: convert::lease_refs_to_wire(&reply.early_stop),
        }))
    }

    #[instrument(skip_all, fields(worker_id = %req.get_ref().worker_id))]
    async fn lease_job(&self, req: Request<v1::LeaseJobRequest>) -> Result<Response<v1::LeaseJobResponse>, Status> {
        let caller = identity(&req)?;
        let ask = convert::lease_request(req.into_inner())?;
        let lease = self.workers.lease(ask, &caller).await?;
        Ok(Response::new(v1::LeaseJobResponse { lease: lease.as_ref().map(convert::lease) }))
    }

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id, epoch = req.get_ref().epoch))]
    async fn report_progress(
        &self,
        req: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        let report = convert::progress(req.into_inner())?;
        let signal = self.workers.report_progress(report).await?;
        Ok(Response::new(convert::stop_signal(signal)))
    }

    #[instrument(skip_all, fields(reports = req.get_ref().reports.len()))]
    async fn report_progress_batch(
        &self,
        req: Request<v1::ReportProgressBatchRequest>,
    ) -> Result<Response<v1::ReportProgressBatchResponse>, Status> {
        let reports = req.into_inner().reports.into_iter().map(convert::progress).collect::<Result<_, _>>()?;
        let answers = self.workers.report_progress_batch(reports).await?;
        Ok(Response::new(v1::ReportProgressBatchResponse {
            answers: answers.into_iter().map(|(lease, outcome)| convert::progress_answer(lease, outcome)).collect(),
        }))
    }

    #[instrument(skip_all)]
    async fn complete_job(
        &self,
        req: Request<Streaming<v1::CompleteJobChunk>>,
    ) -> Result<Response<v1::CompleteJobResponse>, Status> {
        let caller = identity(&req)?;
        let mut chunks = req.into_inner();
        let first = super::next_message(&mut chunks, self.upload_idle).await?;
        let Some(Part::Header(mut header)) = first.and_then(|c| c.part) else {
            return Err(Error::invalid("header", "the first message must carry the header").into());
        };
        let next = convert::next_lease(header.next.take())?;
        let mut upload = self.workers.begin_completion(convert::completion(header)?).await?;
        while let Some(chunk) = super::next_message(&mut chunks, self.upload_idle).await? {
            let Some(Part::Data(data)) = chunk.part else {
                return Err(Error::invalid("header", "only the first message may carry a header").into());
            };
            upload.push(&data).await?;
        }
        let next = self.workers.complete(upload, next, &caller).await?;
        Ok(Response::new(v1::CompleteJobResponse { next: next.as_ref().map(convert::lease) }))
    }

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id, epoch = req.get_ref().epoch))]
    async fn fail_job(&self, req: Request<v1::FailJobRequest>) -> Result<Response<v1::FailJobResponse>, Status> {
        let failure = convert::failure(req.into_inner())?;
        self.workers.fail(failure).await?;
        Ok(Response::new(v1::FailJobResponse {}))
    }

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id, epoch = req.get_ref().epoch))]
    async fn release_job(&self, req: Request<v1::ReleaseJobRequest>) -> Result<Response<v1::ReleaseJobResponse>, Status> {
        let release = convert::release(req.into_inner())?;
        self.workers.release(release).await?;
        Ok(Response::new(v1::ReleaseJobResponse {}))
    }

    #[instrument(skip_all)]
    async fn upload_checkpoint(
        &self,
        req: Request<Streaming<v1::CheckpointChunk>>,
    ) -> Result<Response<v1::UploadCheckpointResponse>, Status> {
        let mut chunks = req.into_inner();
        let first = super::next_message(&mut chunks, self.upload_idle).await?;
        let Some(v1::checkpoint_chunk::Part::Header(header)) = first.and_then(|c| c.part) else {
            return Err(Error::invalid("header", "the first message must carry the header").into());
        };
        let mut sink = self.workers.begin_checkpoint(convert::checkpoint_upload(header)?).await?;
        while let Some(chunk) = super::next_message(&mut chunks, self.upload_idle).await? {
            let Some(v1::checkpoint_chunk::Part::Data(data)) = chunk.part else {
                return Err(Error::invalid("header", "only the first message may carry a header").into());
            };
            sink.push(&data).await?;
        }
        let stored = sink.finish().await?;
        Ok(Response::new(v1::UploadCheckpointResponse { stored }))
    }

    type DownloadCheckpointStream = Pin<Box<dyn Stream<Item = Result<v1::CheckpointChunk, Status>> + Send + 'static>>;

    #[instrument(skip_all, fields(job_id = %req.get_ref().job_id, epoch = req.get_ref().epoch))]
    async fn download_checkpoint(
        &self,
        req: Request<v1::DownloadCheckpointRequest>,
    ) -> Result<Response<Self::DownloadCheckpointStream>, Status> {
        let req = req.into_inner();
        let lease = convert::lease_ref(&req.job_id, req.epoch, &req.lease_token, "job_id")?;
        let (info, chunks) = self.workers.checkpoint(lease).await?;
        let header = v1::CheckpointChunk {
            part: Some(v1::checkpoint_chunk::Part::Header(v1::CheckpointHeader {
                job_id: req.job_id,
                epoch: req.epoch,
                step: info.step,
                sha256: info.sha256,
                size: info.size,
                lease_token: String::new(),
            })),
        };
        let data = chunks.map(|data| Ok(v1::CheckpointChunk { part: Some(v1::checkpoint_chunk::Part::Data(data?)) }));
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(header) }).chain(data))))
    }

    type DownloadDatasetStream = ChunkStream;

    #[instrument(skip_all)]
    async fn download_dataset(
        &self,
        req: Request<v1::DownloadDatasetRequest>,
    ) -> Result<Response<Self::DownloadDatasetStream>, Status> {
        let req = req.into_inner();
        let reference = convert::dataset_ref(&req.reference)?;
        let lease = convert::lease_ref(&req.job_id, req.epoch, &req.lease_token, "job_id")?;
        let (info, chunks) = self.workers.dataset(reference, lease).await?;
        let stream = chunks.enumerate().map(move |(i, data)| {
            let file_name = if i == 0 { info.file_name.clone() } else { String::new() };
            Ok(v1::DatasetChunk { file_name, data: data? })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
