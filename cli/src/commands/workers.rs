//! `ptune workers ...`: the fleet as the coordinator sees it.

use clap::Subcommand;
use ptune_proto::v1::{self, job_service_client::JobServiceClient};
use ptune_proto::client::AuthChannel;

use super::status_error;
use crate::output;
use crate::view::WorkerView;
use crate::Format;

#[derive(Debug, Subcommand)]
pub enum WorkersCommand {
    /// Registered workers, online first: slots in use, models, heartbeat age,
    /// and why an unhealthy worker takes no jobs.
    List {
        /// At most this many workers.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub async fn run(mut client: JobServiceClient<AuthChannel>, format: Format, cmd: WorkersCommand) -> anyhow::Result<i32> {
    match cmd {
        WorkersCommand::List { limit } => {
            let workers = client
                .list_workers(v1::ListWorkersRequest { page_size: limit })
                .await
                .map_err(status_error)?
                .into_inner()
                .workers;
            let views: Vec<WorkerView> = workers.iter().map(WorkerView::from).collect();
            if format == Format::Json {
                output::json(&views);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = views
                .iter()
                .map(|w| {
                    let health = match (w.online, w.unhealthy_reason.as_str()) {
                        (false, _) => "offline".to_string(),
                        (true, "") => "healthy".to_string(),
                        (true, reason) => format!("unhealthy: {reason}"),
                    };
                    vec![
                        w.worker_id.clone(),
                        w.hostname.clone(),
                        format!("{}/{}", w.running, w.slots),
                        format!("{:.1}s", w.heartbeat_age_seconds),
                        w.devices.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                        w.models.join(","),
                        health,
                    ]
                })
                .collect();
            output::table(&["WORKER", "HOST", "RUNNING", "HEARTBEAT", "DEVICES", "MODELS", "HEALTH"], &rows);
            Ok(0)
        }
    }
}
