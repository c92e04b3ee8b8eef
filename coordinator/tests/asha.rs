//! ASHA sweeps through the real SweepService and WorkerService over gRPC,
//! on a real database, trained by the scripted fake worker of
//! `common::sweeps`: every decision is checked against the rule, on
//! synthetic curves, on a plateau, and across coordinator restarts.

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use common::sweeps::*;
use ptune_core::sweep::{decide, Decision, Direction, RungValue};
use ptune_proto::v1;
use serde_json::json;
use sqlx::PgPool;

/// Nine trials in grid order, one at a time, final accuracies
/// 0.5 0.7 0.7 0.9 0.4 0.8 0.3 0.95 0.65, reported as `final * step / 18`.
/// Rungs at steps 2 and 6 (η = 3, maximum 18). With n values at a rung, the
/// top max(1, ⌊n/3⌋) continue, earlier values winning ties:
///   rung 0: t0 t1 go on (first, best of 2); t2 stops (it only ties t1); t3 goes on;
///           t4 stops; t5 goes on (2nd of 6, top 2); t6 stops; t7 goes on;
///           t8 stops (5th of 9, top 3).
///   rung 1: t0 t1 t3 go on (each best so far); t5 stops (2nd of 4, top 1); t7 goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_stops_and_promotes_trials_by_the_rule_on_synthetic_curves() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let finals = [0.5, 0.7, 0.7, 0.9, 0.4, 0.8, 0.3, 0.95, 0.65];
    let lrs: Vec<f64> = (1..=9).map(|i| f64::from(i) / 100.0).collect();
    let mut def = definition(
        "asha",
        &data,
        json!({ "type": "asha", "sampler": "grid", "min_resource": 2, "max_resource": 18, "reduction_factor": 3 }),
        json!({ "training.learning_rate": { "values": lrs } }),
    );
    def["max_concurrent_trials"] = json!(1);
    let created = create(&mut env, &def).await.unwrap();
    assert_eq!((created.rung_steps.as_slice(), created.max_steps, created.trial_budget), (&[2, 6][..], 18, 9));

    let mut worker = FakeWorker::register(&mut env).await;
    worker.rungs = vec![2, 6];
    worker.legacy_ack = HashSet::from([8]);
    let log = worker
        .work(&created.id, |spec| {
            let training = spec.training.as_ref().unwrap();
            assert_eq!((training.max_steps, training.eval_every), (18, 2), "trials run to the maximum, evaluating on every rung");
            Script::Learn { final_accuracy: finals[(learning_rate(spec) * 100.0).round() as usize - 1] }
        })
        .await;
    let stopped_at: HashMap<u32, u64> =
        log.iter().filter_map(|(i, e)| if let Ended::EarlyStopped { step } = e { Some((*i, *step)) } else { None }).collect();
    assert_eq!(stopped_at, HashMap::from([(2, 2), (4, 2), (6, 2), (8, 2), (5, 6)]));

    let done = wait_sweep(&mut env, &created.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let decisions: BTreeSet<(i32, i32, String)> =
        sqlx::query_as("SELECT trial_index, rung, decision FROM asha_decisions WHERE sweep_id = $1::uuid")
            .bind(&created.id)
            .fetch_all(&worker.db)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<(i32, i32, String)> = [
        (0, 0, "promote"), (1, 0, "promote"), (2, 0, "stop"), (3, 0, "promote"), (4, 0, "stop"),
        (5, 0, "promote"), (6, 0, "stop"), (7, 0, "promote"), (8, 0, "stop"),
        (0, 1, "promote"), (1, 1, "promote"), (3, 1, "promote"), (5, 1, "stop"), (7, 1, "promote"),
    ]
    .into_iter()
    .map(|(t, r, d)| (t, r, d.to_string()))
    .collect();
    assert_eq!(decisions, expected);

    let trials = by_index(&done);
    let states: Vec<(v1::TrialState, Option<u32>)> = trials.iter().map(|t| (trial_state(t), t.stopped_rung)).collect();
    use v1::TrialState::{EarlyStopped as E, Succeeded as S};
    assert_eq!(
        states,
        [(S, None), (S, None), (E, Some(0)), (S, None), (E, Some(0)), (E, Some(1)), (E, Some(0)), (S, None), (E, Some(0))]
    );
    let steps: u64 = trials.iter().map(|t| t.step).sum();
    assert_eq!(steps, 4 * 18 + 6 + 4 * 2, "trial-steps spent: 86 against 162 for the full grid");
    assert!((trials[5].objective.unwrap() - 0.8 * 6.0 / 18.0).abs() < 1e-9, "a stopped trial keeps its rung value");
    assert_eq!(trials[5].objective_step, 6);
    assert!(!trials[5].adapter_sha256.is_empty(), "a trial stopped with a new worker keeps its adapter");
    assert!(trials[8].adapter_sha256.is_empty(), "a legacy acknowledgement leaves no adapter");
    let legacy = env.get(&trials[8].job_id).await;
    assert_eq!((common::state(&legacy), legacy.early_stopped), (v1::JobState::Cancelled, true));
    let stopped = env.get(&trials[5].job_id).await;
    assert_eq!((common::state(&stopped), stopped.early_stopped, stopped.step), (v1::JobState::Succeeded, true, 6));
    assert!(!env.get(&trials[7].job_id).await.early_stopped);

    let counts = done.counts.unwrap();
    assert_eq!((counts.succeeded, counts.early_stopped, counts.failed), (4, 5, 0));
    let best = done.best_trial.unwrap();
    assert_eq!(best.index, 7);
    assert!((best.objective.unwrap() - 0.95).abs() < 1e-9);
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asha_breaks_ties_on_a_plateau_with_the_eval_loss() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    // Every trial's accuracy is the majority class at the rung; only the
    // eval loss tells them apart.
    let losses = [0.70, 0.69, 0.60, 0.71, 0.50, 0.65];
    let lrs: Vec<f64> = (1..=6).map(|i| f64::from(i) / 100.0).collect();
    let mut def = definition(
        "plateau",
        &data,
        json!({ "type": "asha", "sampler": "grid", "min_resource": 2, "max_resource": 6, "reduction_factor": 3 }),
        json!({ "training.learning_rate": { "values": lrs } }),
    );
    def["max_concurrent_trials"] = json!(1);
    let created = create(&mut env, &def).await.unwrap();
    assert_eq!(created.rung_steps, [2]);
    let mut worker = FakeWorker::register(&mut env).await;
    worker.rungs = vec![2];
    worker
        .work(&created.id, |spec| Script::Plateau { eval_loss: losses[(learning_rate(spec) * 100.0).round() as usize - 1] })
        .await;
    wait_sweep(&mut env, &created.id, 10, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let decisions: Vec<(i32, String, Option<f64>)> = sqlx::query_as(
        "SELECT trial_index, decision, tiebreak FROM asha_decisions WHERE sweep_id = $1::uuid ORDER BY trial_index",
    )
    .bind(&created.id)
    .fetch_all(&worker.db)
    .await
    .unwrap();
    // A lower loss than every value ahead promotes (0, 1, 2, 4); without the
    // tie-breaker the first trial alone would have gone on.
    let expected: Vec<(i32, String, Option<f64>)> = ["promote", "promote", "promote", "stop", "promote", "stop"]
        .iter()
        .enumerate()
        .map(|(i, d)| (i as i32, d.to_string(), Some(losses[i])))
        .collect();
    assert_eq!(decisions, expected);
    env.stop().await;
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_restart_mid_sweep_loses_and_duplicates_nothing() {
    let mut env = common::start(Duration::from_secs(10)).await;
    let data = datasets(&mut env).await;
    let mut def = definition(
        "restart",
        &data,
        json!({ "type": "asha", "num_trials": 8, "seed": 11, "min_resource": 2, "max_resource": 12, "reduction_factor": 2 }),
        json!({
            "peft.num_virtual_tokens": { "values": [5, 10] },
            "training.learning_rate": { "type": "log_uniform", "min": 1e-3, "max": 1e-1 },
        }),
    );
    def["max_concurrent_trials"] = json!(2);
    let created = create(&mut env, &def).await.unwrap();
    assert_eq!(created.rung_steps, [2, 4, 8]);

    let mut worker = FakeWorker::register(&mut env).await;
    worker.rungs = vec![2, 4, 8];
    worker.step_delay = Duration::from_millis(15);
    let id = created.id.clone();
    let working = tokio::spawn(async move {
        worker
            .work(&id, |spec| {
                let lr = learning_rate(spec);
                Script::Learn { final_accuracy: 0.9 - (lr.log10() + 2.0).abs() * 0.3 + f64::from(prompt_length(spec)) / 1000.0 }
            })
            .await
    });

    let terminal = |s: &v1::Sweep| {
        let c = s.counts.as_ref().unwrap();
        c.succeeded + c.early_stopped + c.failed + c.cancelled
    };
    wait_sweep(&mut env, &created.id, 30, |s| terminal(s) >= 2 && s.counts.as_ref().unwrap().running >= 1).await;
    env.restart_in_place().await;
    wait_sweep(&mut env, &created.id, 30, |s| terminal(s) >= 5 && s.counts.as_ref().unwrap().running >= 1).await;
    env.restart_in_place().await;
    let done = wait_sweep(&mut env, &created.id, 60, |s| sweep_state(s) == v1::SweepState::Completed).await;
    let log = working.await.unwrap();

    let trials = by_index(&done);
    assert_eq!(trials.iter().map(|t| t.index).collect::<Vec<_>>(), (0..8).collect::<Vec<_>>(), "no trial lost or doubled");
    assert_eq!(trials.iter().map(|t| t.job_id.clone()).collect::<HashSet<_>>().len(), 8);
    assert_eq!(trials.iter().map(params).collect::<Vec<_>>(), expected_params(&def, 8));
    let mut ran: Vec<u32> = log.iter().map(|(i, _)| *i).collect();
    ran.sort();
    assert_eq!(ran, (0..8).collect::<Vec<_>>(), "every trial was leased and run exactly once");
    assert!(trials.iter().all(|t| matches!(trial_state(t), v1::TrialState::Succeeded | v1::TrialState::EarlyStopped)));

    // Every decision, replayed in the order taken, follows the rule; each
    // (trial, rung) has exactly one, and none follows a stop.
    let rows: Vec<(i32, i32, String, f64, Option<f64>)> = sqlx::query_as(
        "SELECT trial_index, rung, decision, value, tiebreak FROM asha_decisions WHERE sweep_id = $1::uuid ORDER BY decided_at",
    )
    .bind(&created.id)
    .fetch_all(&PgPool::connect(&env.db.url).await.unwrap())
    .await
    .unwrap();
    let mut at_rung: Vec<Vec<RungValue>> = vec![Vec::new(); 3];
    let mut per_trial: HashMap<i32, Vec<(i32, String)>> = HashMap::new();
    for (trial, rung, decision, value, tiebreak) in &rows {
        let value = RungValue::new(*value, *tiebreak);
        let expected = decide(&at_rung[*rung as usize], value, 2, Direction::Maximize);
        assert_eq!(decision, if expected == Decision::Stop { "stop" } else { "promote" }, "trial {trial} rung {rung}");
        at_rung[*rung as usize].push(value);
        per_trial.entry(*trial).or_default().push((*rung, decision.clone()));
    }
    for t in &trials {
        let decisions = &per_trial[&(t.index as i32)];
        let rungs: Vec<i32> = decisions.iter().map(|(r, _)| *r).collect();
        assert_eq!(rungs, (0..decisions.len() as i32).collect::<Vec<_>>(), "trial {}: one decision per rung, in order", t.index);
        let stops = decisions.iter().filter(|(_, d)| d == "stop").count();
        match trial_state(t) {
            v1::TrialState::EarlyStopped => {
                assert_eq!((stops, decisions.last().unwrap().1.as_str()), (1, "stop"));
                assert_eq!(t.stopped_rung, Some(decisions.len() as u32 - 1));
            }
            _ => assert_eq!((stops, decisions.len()), (0, 3), "trial {} ran to the end past every rung", t.index),
        }
    }
    env.stop().await;
}