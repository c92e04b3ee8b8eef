use serde_json::json;

use crate::spec::Pooling;

use super::*;

fn definition(algorithm: Value, space: Value) -> Value {
    json!({
        "name": "sst2",
        "objective": { "metric": "accuracy", "direction": "maximize" },
        "algorithm": algorithm,
        "template": {
            "base_model": "all-MiniLM-L6-v2",
            "task": "sequence_classification",
            "method": "prompt_tuning",
            "data": { "train": "sha256:a", "eval": "sha256:b", "labels": [0, 1], "max_seq_len": 64 },
            "training": { "learning_rate": 0.03, "batch_size": 32, "max_steps": 90 },
        },
        "space": space,
    })
}

fn sst2_space() -> Value {
    json!({
        "peft": { "num_virtual_tokens": { "values": [5, 10, 20, 50] } },
        "training": { "learning_rate": { "values": [1e-3, 3e-3, 1e-2, 3e-2] } },
    })
}

fn parse(value: Value) -> Result<SweepDefinition, SpecError> {
    SweepDefinition::from_json(&value)
}

fn trial_keys(d: &SweepDefinition, n: u32) -> Vec<String> {
    let mut taken = HashSet::new();
    (0..n)
        .map(|i| {
            let key = d.params_for(i, &taken).unwrap().key();
            taken.insert(key.clone());
            key
        })
        .collect()
}

#[test]
fn a_grid_definition_plans_the_product_and_trial_specs_carry_the_values() {
    let d = parse(definition(json!({ "type": "grid" }), sst2_space())).unwrap();
    assert_eq!((d.kind(), d.budget()), (AlgorithmKind::Grid, 16));
    let keys = trial_keys(&d, 16);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 16);
    assert_eq!(keys[1], r#"{"peft.num_virtual_tokens":5,"training.learning_rate":0.003}"#);
    assert!(d.params_for(16, &HashSet::new()).is_none());

    let spec = d.trial_spec(7, &d.params_for(7, &HashSet::new()).unwrap(), None).unwrap();
    assert_eq!((spec.name.as_str(), spec.peft.num_virtual_tokens, spec.training.learning_rate), ("sst2-t7", 10, 3e-2));
    assert_eq!(spec.data.labels, ["0", "1"]);
}

#[test]
fn random_trials_are_reproducible_from_the_seed_and_never_repeat_a_configuration() {
    let random = |seed: u64| parse(definition(json!({ "type": "random", "num_trials": 16, "seed": seed }), sst2_space())).unwrap();
    let (a, b, c) = (random(7), random(7), random(8));
    assert_eq!(trial_keys(&a, 16), trial_keys(&b, 16));
    assert_ne!(trial_keys(&a, 16), trial_keys(&c, 16));
    assert_eq!(trial_keys(&a, 16).iter().collect::<HashSet<_>>().len(), 16, "a discrete space is drawn without repeats");
    let all: HashSet<String> = trial_keys(&a, 16).into_iter().collect();
    assert!(a.params_for(16, &all).is_none(), "nothing is left to draw");
    let err = parse(definition(json!({ "type": "random", "num_trials": 17 }), sst2_space())).unwrap_err();
    assert_eq!(err.field, "algorithm.num_trials");
}

#[test]
fn asha_trials_run_to_the_maximum_and_evaluate_on_every_rung() {
    let d = parse(definition(
        json!({ "type": "asha", "sampler": "grid", "min_resource": 10, "max_resource": 90, "reduction_factor": 3 }),
        sst2_space(),
    ))
    .unwrap();
    assert_eq!(d.budget(), 16);
    let plan = d.asha().unwrap().plan(None).unwrap();
    let spec = d.trial_spec(0, &d.params_for(0, &HashSet::new()).unwrap(), Some(&plan)).unwrap();
    assert_eq!((spec.training.max_steps, spec.training.eval_every), (90, 10));
    let err = parse(definition(
        json!({ "type": "asha", "min_resource": 10, "max_resource": 90 }),
        json!({ "training.max_steps": { "values": [10, 20] } }),
    ))
    .unwrap_err();
    assert_eq!(err.field, "space.training.max_steps");
}

#[test]
fn invalid_definitions_name_the_field() {
    let err = |algorithm: Value, space: Value| parse(definition(algorithm, space)).unwrap_err();
    let grid = json!({ "type": "grid" });
    assert_eq!(err(grid.clone(), json!({})).field, "space");
    assert_eq!(
        err(json!({ "type": "random", "num_trials": 4 }), json!({ "training.learning_rate": { "type": "log_uniform", "min": 0, "max": 1 } })).to_string(),
        "space.training.learning_rate: log-uniform bounds must be > 0, got 0"
    );
    let big = json!({ "peft.num_virtual_tokens": { "type": "int_range", "min": 1, "max": 100 }, "training.learning_rate": { "values": [0.1, 0.2, 0.3] } });
    let e = err(json!({ "type": "grid", "max_trials": 200 }), big);
    assert_eq!(e.field, "space");
    assert!(e.message.contains("300 or more configurations, more than the cap of 200"), "{e}");
    let e = err(grid.clone(), json!({ "peft.num_virtual_tokens": { "values": [5, 600] } }));
    assert_eq!(e.to_string(), "space.peft.num_virtual_tokens: prompt length must be between 1 and 512, got 600");
    let e = err(grid.clone(), json!({ "peft.prompt_length": { "values": [5] } }));
    assert_eq!(e.field, "space.peft.prompt_length");
    assert!(e.message.contains("unknown field `prompt_length`"), "{e}");
    assert_eq!(err(grid.clone(), json!({ "peft.num_virtual_tokens": { "values": [5.5] } })).field, "space.peft.num_virtual_tokens");
    assert_eq!(err(grid.clone(), json!({ "training.learning_rate": { "type": "uniform", "min": 0.1, "max": 0.2 } })).field, "space.training.learning_rate");
    assert_eq!(err(json!({ "type": "grid", "seed": 1 }), sst2_space()).field, "algorithm.seed");
    assert_eq!(err(json!({ "type": "bayes" }), sst2_space()).field, "algorithm.type");
    assert_eq!(err(json!({ "type": "random" }), sst2_space()).field, "algorithm.num_trials");

    let mut missing_model = definition(grid.clone(), sst2_space());
    missing_model["template"].as_object_mut().unwrap().remove("base_model");
    assert_eq!(parse(missing_model).unwrap_err().field, "template");
    let mut bad_template = definition(grid, sst2_space());
    bad_template["template"]["training"]["batch_size"] = json!(0);
    assert_eq!(parse(bad_template).unwrap_err().field, "template.training.batch_size");
    let mut no_direction = definition(json!({ "type": "grid" }), sst2_space());
    no_direction["objective"].as_object_mut().unwrap().remove("direction");
    assert_eq!(parse(no_direction).unwrap_err().field, "objective");
}

#[test]
fn the_example_sweeps_plan_what_their_comments_say() {
    let example = |text: &str| {
        let value: toml::Value = toml::from_str(text).unwrap();
        parse(serde_json::to_value(value).unwrap()).unwrap()
    };
    let grid = example(include_str!("../../../../examples/sweeps/sst2-grid.toml"));
    assert_eq!((grid.kind(), grid.budget()), (AlgorithmKind::Grid, 16));
    let asha = example(include_str!("../../../../examples/sweeps/sst2-asha.toml"));
    assert_eq!((asha.kind(), asha.budget(), asha.distinct_configs()), (AlgorithmKind::Asha, 16, Some(16)));
    let plan = asha.asha().unwrap().plan(None).unwrap();
    assert_eq!((plan.rungs.as_slice(), plan.max_steps, plan.eval_every(0)), (&[27, 81][..], 243, 27));
    let mut taken = HashSet::new();
    for i in 0..16 {
        taken.insert(asha.params_for(i, &taken).unwrap().key());
    }
    let grid_keys: HashSet<String> = (0..16).map(|i| grid.params_for(i, &HashSet::new()).unwrap().key()).collect();
    assert_eq!(taken, grid_keys, "asha draws each of the grid's 16 configurations once");

    let lora = example(include_str!("../../../../examples/sweeps/e2e-lora-asha.toml"));
    assert_eq!((lora.kind(), lora.budget()), (AlgorithmKind::Asha, 12));
    let plan = lora.asha().unwrap().plan(None).unwrap();
    assert_eq!((plan.rungs.as_slice(), plan.max_steps, plan.eval_every(0)), (&[100, 300][..], 900, 100));
    let mut taken = HashSet::new();
    for i in 0..12 {
        let params = lora.params_for(i, &taken).unwrap();
        let spec = lora.trial_spec(i, &params, Some(&plan)).unwrap();
        spec.validate(None).unwrap();
        assert!([4, 8, 16].contains(&spec.peft.lora_r()), "{params:?}");
        assert!((5e-5..=1e-3).contains(&spec.training.learning_rate), "{params:?}");
        taken.insert(params.key());
    }
}

#[test]
fn the_head_pooling_can_be_searched() {
    let space = json!({ "head.pooling": { "values": ["cls", "mean"] }, "training.learning_rate": { "values": [0.01] } });
    let d = parse(definition(json!({ "type": "grid" }), space)).unwrap();
    let poolings: Vec<Pooling> = (0..d.budget())
        .map(|i| d.trial_spec(i, &d.params_for(i, &HashSet::new()).unwrap(), None).unwrap().head.pooling)
        .collect();
    assert_eq!(poolings, [Pooling::Cls, Pooling::Mean]);
    let bad = json!({ "head.pooling": { "values": ["cls", "max"] } });
    let err = parse(definition(json!({ "type": "grid" }), bad)).unwrap_err();
    assert_eq!(err.field, "space.head.pooling", "{err}");
}

#[test]
fn conditions_see_the_template_and_the_spec_defaults() {
    let space = json!({
        "peft.init_text": { "values": ["great", "awful"], "when": { "peft.init": "text" } },
        "training.learning_rate": { "values": [0.01, 0.03] },
    });
    let d = parse(definition(json!({ "type": "grid" }), space.clone())).unwrap();
    assert_eq!(d.budget(), 2, "the template leaves peft.init at its default, random");
    let mut with_text = definition(json!({ "type": "grid" }), space);
    with_text["template"]["peft"] = json!({ "init": "text", "init_text": "fine" });
    assert_eq!(parse(with_text).unwrap().budget(), 4);
}
