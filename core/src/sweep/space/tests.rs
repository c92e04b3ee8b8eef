use serde_json::json;

use super::*;

fn no_context(params: &Params, path: &str) -> Option<Value> {
    params.get(path).cloned()
}

fn space(value: Value) -> SearchSpace {
    SearchSpace::from_json(&value).unwrap()
}

fn error(value: Value) -> SpecError {
    SearchSpace::from_json(&value).unwrap_err()
}

#[test]
fn the_grid_is_the_product_in_a_fixed_order_first_path_slowest() {
    let s = space(json!({
        "training": { "learning_rate": { "values": [1e-3, 3e-3] } },
        "peft.num_virtual_tokens": { "type": "int_range", "min": 5, "max": 15, "step": 5 },
    }));
    let grid = s.grid(&no_context, 100).unwrap();
    let pairs: Vec<(i64, f64)> = grid
        .iter()
        .map(|p| (p.get("peft.num_virtual_tokens").unwrap().as_i64().unwrap(), p.get("training.learning_rate").unwrap().as_f64().unwrap()))
        .collect();
    assert_eq!(pairs, [(5, 1e-3), (5, 3e-3), (10, 1e-3), (10, 3e-3), (15, 1e-3), (15, 3e-3)]);
    assert_eq!(s.grid(&no_context, 5), Err(GridError::TooLarge { at_least: 6 }));
}

#[test]
fn conditional_parameters_join_the_grid_only_where_their_condition_holds() {
    let s = space(json!({
        "peft": {
            "init": { "values": ["random", "text"] },
            "init_text": { "values": ["great", "awful"], "when": { "peft.init": "text" } },
        },
    }));
    let keys: Vec<String> = s.grid(&no_context, 100).unwrap().iter().map(Params::key).collect();
    assert_eq!(
        keys,
        [
            r#"{"peft.init":"random"}"#,
            r#"{"peft.init":"text","peft.init_text":"great"}"#,
            r#"{"peft.init":"text","peft.init_text":"awful"}"#,
        ]
    );
    let mut rng = SplitMix64::new(1);
    for _ in 0..50 {
        let p = s.sample(&mut rng, &no_context);
        assert_eq!(p.get("peft.init_text").is_some(), p.get("peft.init") == Some(&json!("text")), "{p}");
    }
}

#[test]
fn samples_stay_in_their_domains_and_log_uniform_covers_its_decades_evenly() {
    let s = space(json!({
        "training.learning_rate": { "type": "log_uniform", "min": 1e-4, "max": 1e-1 },
        "training.warmup_ratio": { "type": "uniform", "min": 0.0, "max": 0.2 },
        "peft.num_virtual_tokens": { "type": "int_range", "min": 4, "max": 10, "step": 3 },
    }));
    let mut rng = SplitMix64::new(9);
    let mut per_decade = [0u32; 3];
    for _ in 0..3000 {
        let p = s.sample(&mut rng, &no_context);
        let lr = p.get("training.learning_rate").unwrap().as_f64().unwrap();
        assert!((1e-4..=1e-1).contains(&lr));
        per_decade[((lr.log10() + 4.0).floor() as usize).min(2)] += 1;
        assert!((0.0..0.2).contains(&p.get("training.warmup_ratio").unwrap().as_f64().unwrap()));
        assert!([4, 7, 10].contains(&p.get("peft.num_virtual_tokens").unwrap().as_i64().unwrap()));
    }
    for n in per_decade {
        assert!((900..1100).contains(&n), "log-uniform puts a third in each decade: {per_decade:?}");
    }
    let lr = s.sample(&mut rng, &no_context).get("training.learning_rate").unwrap().to_string();
    assert!(lr.trim_start_matches("0.").trim_start_matches('0').len() <= 8, "8 significant digits: {lr}");
    assert!(!s.is_discrete());
    assert!(matches!(s.grid(&no_context, 100), Err(GridError::Continuous { .. })));
}

#[test]
fn bad_spaces_are_refused_naming_the_parameter() {
    assert_eq!(error(json!({})).field, "space");
    let e = error(json!({ "training": { "learning_rate": { "type": "log_uniform", "min": 0, "max": 0.1 } } }));
    assert_eq!(e.to_string(), "space.training.learning_rate: log-uniform bounds must be > 0, got 0");
    assert_eq!(error(json!({ "peft.num_virtual_tokens": { "values": [] } })).field, "space.peft.num_virtual_tokens.values");
    assert_eq!(error(json!({ "a": { "values": [1, 1.0] } })).field, "space.a.values");
    assert_eq!(error(json!({ "a": { "type": "int_range", "min": 5, "max": 1 } })).field, "space.a");
    assert_eq!(error(json!({ "a": { "type": "gaussian", "min": 5, "max": 1 } })).field, "space.a.type");
    assert_eq!(error(json!({ "a": { "values": [1], "stp": 1 } })).field, "space.a.stp");
    assert_eq!(error(json!({ "name": { "values": ["x"] } })).field, "space.name");
    assert_eq!(error(json!({ "training": { "learning_rate": 0.1 } })).field, "space.training.learning_rate");
    let e = error(json!({
        "a": { "values": [1], "when": { "b": 1 } },
        "b": { "values": [1], "when": { "c": 1 } },
    }));
    assert_eq!(e.field, "space.a.when");
}

#[test]
fn extreme_configs_reach_every_value_and_both_ends() {
    let s = space(json!({
        "a": { "values": [1, 2, 3] },
        "b": { "type": "uniform", "min": 0.5, "max": 2.0 },
    }));
    let configs = s.extreme_configs(&no_context);
    let seen = |path: &str, v: Value| configs.iter().any(|c| c.get(path).is_some_and(|x| same_value(x, &v)));
    for v in [json!(1), json!(2), json!(3)] {
        assert!(seen("a", v));
    }
    assert!(seen("b", json!(0.5)) && seen("b", json!(2.0)));
    assert!(configs.iter().any(|c| c.key() == r#"{"a":3,"b":2.0}"#), "the all-last corner is checked");
}
