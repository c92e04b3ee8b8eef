//! `SubmitJobs` over real gRPC: a thousand specs with a few bad ones among
//! them are checked one by one, the good ones stored in one call with their
//! ids in order and the bad ones answered with the field at fault; an
//! all-or-nothing batch with one bad spec stores nothing; a malformed batch
//! is refused whole; a viewer may not submit.

mod common;

use std::time::Duration;

use ptune_proto::v1;
use tonic::Code;

fn outcomes(reply: &v1::SubmitJobsResponse) -> Vec<Result<&str, &v1::ItemError>> {
    reply.results.iter().map(|r| r.error.as_ref().map_or(Ok(r.job_id.as_str()), Err)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_stores_every_admitted_spec_and_names_each_refusal() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let good = env.spec("batch").await;
    let mut specs: Vec<v1::JobSpec> =
        (0..1000).map(|i| v1::JobSpec { name: format!("batch-{i}"), ..good.clone() }).collect();
    // Three refusals at known places: a learning rate out of range, a
    // dataset never uploaded, and a spec with no data section.
    specs[10].training.as_mut().unwrap().learning_rate = -1.0;
    specs[500].data.as_mut().unwrap().train = format!("sha256:{}", "0".repeat(64));
    specs[999].data = None;

    let reply = env
        .jobs
        .submit_jobs(v1::SubmitJobsRequest { specs: specs.clone(), all_or_nothing: false })
        .await
        .expect("the batch is answered")
        .into_inner();
    let results = outcomes(&reply);
    assert_eq!(results.len(), 1000);
    assert_eq!(reply.submitted, 997);
    for i in [10, 500, 999] {
        assert!(results[i].is_err(), "item {i} is refused");
    }
    let lr = results[10].unwrap_err();
    assert_eq!((lr.code.as_str(), lr.field.as_str()), ("INVALID_ARGUMENT", "training.learning_rate"));
    assert!(lr.message.contains("must be"), "{lr:?}");
    let dataset = results[500].unwrap_err();
    assert_eq!((dataset.code.as_str(), dataset.field.as_str()), ("INVALID_ARGUMENT", "data.train"));
    assert!(dataset.message.contains("not uploaded"), "{dataset:?}");
    assert_eq!(results[999].unwrap_err().field, "data");

    // Every stored job is there under its own name, in order.
    for i in [0, 1, 499, 501, 998] {
        let job = env.get(results[i].unwrap()).await;
        assert_eq!(job.spec.as_ref().unwrap().name, format!("batch-{i}"));
        assert_eq!(common::state(&job), v1::JobState::Queued);
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&sqlx::PgPool::connect(&env.db.url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(stored, 997);

    // All or nothing: one bad spec, nothing stored, each good one told why.
    let reply = env
        .jobs
        .submit_jobs(v1::SubmitJobsRequest { specs: specs[..20].to_vec(), all_or_nothing: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.submitted, 0);
    let results = outcomes(&reply);
    assert_eq!(results[10].unwrap_err().field, "training.learning_rate");
    let held = results[0].unwrap_err();
    assert_eq!(held.code, "FAILED_PRECONDITION");
    assert!(held.message.contains("items 10"), "{held:?}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
        .fetch_one(&sqlx::PgPool::connect(&env.db.url).await.unwrap())
        .await
        .unwrap();
    assert_eq!(stored, 997, "nothing of the refused batch was stored");

    // A batch that is itself malformed is refused whole.
    let empty = env.jobs.submit_jobs(v1::SubmitJobsRequest::default()).await.unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().starts_with("specs: must hold 1 to 10000 specs"), "{}", empty.message());
    let tiny = v1::JobSpec { name: "x".into(), ..good.clone() };
    let too_many = env
        .jobs
        .submit_jobs(v1::SubmitJobsRequest { specs: vec![tiny; 10_001], all_or_nothing: false })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument, "{too_many:?}");

    // A viewer may not submit, in a batch or not.
    let mut viewer = v1::job_service_client::JobServiceClient::new(ptune_coordinator::testing::channel(
        &format!("http://{}", env.coordinator.as_ref().unwrap().grpc_addr),
        &env.tokens.viewer,
    ));
    let refused =
        viewer.submit_jobs(v1::SubmitJobsRequest { specs: vec![good], all_or_nothing: false }).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
}
