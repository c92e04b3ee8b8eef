use super::*;

const SPEC: &str = r#"
    name = "sst2"
    base_model = "all-MiniLM-L6-v2"
    task = "sequence_classification"
    method = "prompt_tuning"
    [peft]
    num_virtual_tokens = 20
    [data]
    train = "train.jsonl"
    eval = "dev.jsonl"
    labels = [0, 1]
    max_seq_len = 64
    [training]
    learning_rate = 3e-2
"#;

fn field_of(spec: &JobSpec, limits: Option<&ModelLimits>) -> String {
    spec.validate(limits).unwrap_err().field
}

#[test]
fn a_valid_spec_parses_with_defaults_and_numeric_labels() {
    let spec = JobSpec::from_toml(SPEC).unwrap();
    assert_eq!(spec.data.labels, ["0", "1"]);
    assert_eq!(spec.training.batch_size, 32);
    assert_eq!(spec.max_attempts, DEFAULT_MAX_ATTEMPTS);
    spec.validate(Some(&ModelLimits { max_positions: 512 })).unwrap();
    assert_eq!(spec.label_index(&serde_json::json!(1)), Some(1));
    assert_eq!(spec.label_index(&serde_json::json!(2)), None);
}

#[test]
fn bad_fields_are_named_with_the_allowed_range() {
    let mut spec = JobSpec::from_toml(SPEC).unwrap();
    spec.peft.num_virtual_tokens = 0;
    let err = spec.validate(None).unwrap_err();
    assert_eq!(err.field, "peft.num_virtual_tokens");
    assert!(err.message.contains("between 1 and 512, got 0"), "{err}");

    let mut spec = JobSpec::from_toml(SPEC).unwrap();
    spec.peft.num_virtual_tokens = 500;
    assert_eq!(field_of(&spec, Some(&ModelLimits { max_positions: 512 })), "peft.num_virtual_tokens");

    let mut spec = JobSpec::from_toml(SPEC).unwrap();
    spec.training.learning_rate = 0.0;
    assert_eq!(field_of(&spec, None), "training.learning_rate");
}

#[test]
fn unknown_methods_are_refused_with_the_allowed_list() {
    let text = SPEC.replace("\"prompt_tuning\"", "\"adapterfusion\"");
    let err = JobSpec::from_toml(&text).unwrap_err();
    assert!(err.message.contains("unknown method \"adapterfusion\""), "{err}");
    assert!(err.message.contains("prompt_tuning, p_tuning, prefix_tuning"), "{err}");
}

fn with_method(method: &str, peft: &str) -> Result<JobSpec, SpecError> {
    let text = SPEC.replace("\"prompt_tuning\"", &format!("{method:?}")).replace(
        "[peft]\n    num_virtual_tokens = 20",
        &format!("[peft]\n    num_virtual_tokens = 20\n{peft}"),
    );
    let spec = JobSpec::from_toml(&text)?;
    spec.validate(Some(&ModelLimits { max_positions: 512 }))?;
    Ok(spec)
}

#[test]
fn method_settings_are_accepted_only_where_they_apply() {
    let spec = with_method("p_tuning", "encoder_reparameterization_type = \"lstm\"\nencoder_hidden_size = 64").unwrap();
    assert_eq!((spec.peft.encoder_type(), spec.peft.encoder_hidden_size_for(384)), (EncoderType::Lstm, 64));
    assert_eq!(spec.peft.encoder_num_layers(), DEFAULT_ENCODER_NUM_LAYERS);
    let spec = with_method("prefix_tuning", "prefix_projection = true\nencoder_hidden_size = 128").unwrap();
    assert!(spec.peft.prefix_projection());
    let spec = with_method("lora", "r = 4\nlora_alpha = 16\ntarget_modules = [\"query\", \"attention.output.dense\"]").unwrap();
    assert_eq!((spec.peft.lora_r(), spec.peft.lora_alpha()), (4, 16.0));
    with_method("p_tuning_v2", "prefix_dropout = 0.1").unwrap();
    with_method("full", "").unwrap();

    let refused = |method: &str, peft: &str| with_method(method, peft).unwrap_err();
    let err = refused("prompt_tuning", "encoder_hidden_size = 64");
    assert_eq!(err.to_string(), "peft.encoder_hidden_size: only applies to method p_tuning or prefix_tuning; this job's method is prompt_tuning");
    let err = refused("prefix_tuning", "encoder_hidden_size = 64");
    assert_eq!(err.field, "peft.encoder_hidden_size");
    assert!(err.message.contains("prefix_projection = true"), "{err}");
    assert_eq!(refused("p_tuning", "encoder_num_layers = 3").field, "peft.encoder_num_layers");
    assert_eq!(refused("lora", "prefix_dropout = 0.1").field, "peft.prefix_dropout");
    assert_eq!(refused("p_tuning", "init = \"vocab\"").field, "peft.init");
    let err = refused("lora", "r = 0");
    assert_eq!(err.to_string(), "peft.r: must be between 1 and 1024, got 0");
    let err = refused("lora", "lora_dropout = 1.0");
    assert_eq!(err.to_string(), "peft.lora_dropout: must be at least 0 and less than 1, got 1");
    assert_eq!(refused("lora", "target_modules = []").field, "peft.target_modules");
    assert_eq!(refused("lora", "target_modules = [\"query\", \"query\"]").field, "peft.target_modules");
    let err = refused("p_tuning", "encoder_reparameterization_type = \"gru\"");
    assert_eq!(err.field, "spec");
    assert!(err.message.contains("mlp") && err.message.contains("lstm"), "{err}");
}

/// Every example job in `examples/jobs/` parses and validates as written.
#[test]
fn every_example_job_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let (mut methods, mut tasks) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(&dir).expect("examples/jobs exists") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        let spec = JobSpec::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        spec.validate(Some(&ModelLimits { max_positions: 512 }))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        methods.push(spec.method);
        tasks.push(spec.task);
    }
    for method in Method::ALL {
        assert!(methods.contains(&method), "no example job in {} uses method {method}", dir.display());
    }
    for task in Task::ALL {
        assert!(tasks.contains(&task), "no example job in {} has task {task}", dir.display());
    }
}

/// The spec with `task`, its `labels` line replaced by `lines`; a
/// `[generation]` section in `lines` moves to the end.
fn with_task(task: &str, lines: &str) -> Result<JobSpec, SpecError> {
    let (data, generation) = lines.split_once("[generation]").map_or((lines, ""), |(d, g)| (d, g));
    let mut text = SPEC.replace("\"sequence_classification\"", &format!("{task:?}")).replace("labels = [0, 1]\n", data);
    if !generation.is_empty() {
        text.push_str(&format!("[generation]{generation}"));
    }
    let spec = JobSpec::from_toml(&text)?;
    spec.validate(Some(&ModelLimits { max_positions: 512 }))?;
    Ok(spec)
}

#[test]
fn token_classification_takes_bio_tags() {
    let spec = with_task("token_classification", "labels = [\"O\", \"B-person\", \"I-person\"]\n").unwrap();
    assert_eq!(spec.data.labels.len(), 3);
    let err = with_task("token_classification", "labels = [\"O\", \"person\"]\n").unwrap_err();
    assert_eq!(err.field, "data.labels");
    assert!(err.message.contains("\"person\""), "{err}");
    assert_eq!(with_task("token_classification", "labels = [\"O\"]\n").unwrap_err().field, "data.labels");
}

#[test]
fn pooling_is_named_and_only_for_sequence_classification() {
    let spec = JobSpec::from_toml(&format!("{SPEC}[head]\npooling = \"mean\"\n")).unwrap();
    assert_eq!(spec.head.pooling, Pooling::Mean);
    assert_eq!(spec.to_json()["head"]["pooling"], "mean");
    let back: JobSpec = serde_json::from_value(spec.to_json()).unwrap();
    assert_eq!(back, spec);
    // The default is left out of the stored spec, and read back when absent.
    let plain = JobSpec::from_toml(SPEC).unwrap();
    assert_eq!(plain.head.pooling, Pooling::Cls);
    assert!(plain.to_json().get("head").is_none());

    let err = JobSpec::from_toml(&format!("{SPEC}[head]\npooling = \"max\"\n")).unwrap_err();
    assert!(err.message.contains("unknown pooling \"max\"; allowed: cls, mean"), "{err}");
    let mut tagger = with_task("token_classification", "labels = [\"O\", \"B-person\"]\n").unwrap();
    tagger.head.pooling = Pooling::Mean;
    let err = tagger.validate(None).unwrap_err();
    assert_eq!(err.to_string(), "head.pooling: only applies to task sequence_classification; this job's task is token_classification");
}

#[test]
fn causal_lm_has_no_labels_and_counts_generated_tokens() {
    let spec = with_task("causal_lm", "\n[generation]\nmax_new_tokens = 32\nnum_beams = 4\n").unwrap();
    assert_eq!(spec.generation().num_beams, 4);
    assert!(spec.data.labels.is_empty());
    assert_eq!(with_task("sequence_classification", "").unwrap_err().field, "data.labels");
    let err = with_task("causal_lm", "labels = [0, 1]\n").unwrap_err();
    assert_eq!(err.field, "data.labels");
    assert_eq!(with_task("causal_lm", "\n[generation]\nnum_beams = 0\n").unwrap_err().field, "generation.num_beams");
    let err = with_task("sequence_classification", "labels = [0, 1]\n[generation]\nnum_beams = 2\n").unwrap_err();
    assert_eq!(err.to_string(), "generation: only applies to task causal_lm; this job's task is sequence_classification");
    let err = with_task("sequence_classification", "labels = [0, 1]\nreferences_field = \"refs\"\n").unwrap_err();
    assert_eq!(err.field, "data.references_field");

    // 20 virtual tokens + 64 + 64 generated = 148 positions.
    let spec = with_task("causal_lm", "\n[generation]\nmax_new_tokens = 64\n").unwrap();
    spec.validate(Some(&ModelLimits { max_positions: 148 })).unwrap();
    let err = spec.validate(Some(&ModelLimits { max_positions: 147 })).unwrap_err();
    assert_eq!(err.field, "peft.num_virtual_tokens");
    assert!(err.message.contains("plus generation.max_new_tokens 64 exceeds the 147 positions"), "{err}");

    let causal = |method: &str| {
        let text = SPEC.replace("\"prompt_tuning\"", &format!("{method:?}")).replace("\"sequence_classification\"", "\"causal_lm\"")
            .replace("num_virtual_tokens = 20", "").replace("labels = [0, 1]\n", "");
        JobSpec::from_toml(&text)?.validate(None)
    };
    causal("lora").expect("LoRA trains causal LMs");
    causal("full").expect("full fine-tuning trains causal LMs");

    // Without virtual tokens, the sequence and the generated tokens share the positions.
    let mut lora = JobSpec::from_toml(&SPEC.replace("\"prompt_tuning\"", "\"lora\"").replace("\"sequence_classification\"", "\"causal_lm\"")
        .replace("num_virtual_tokens = 20", "").replace("labels = [0, 1]\n", "")).unwrap();
    lora.data.max_seq_len = 32;
    let err = lora.validate(Some(&ModelLimits { max_positions: 48 })).unwrap_err();
    assert_eq!(
        err.to_string(),
        "data.max_seq_len: data.max_seq_len 32 plus generation.max_new_tokens 64 exceeds the 48 positions of all-MiniLM-L6-v2; \
         generate fewer than 48 tokens"
    );
    lora.generation = Some(GenerationConfig { max_new_tokens: 20, num_beams: 1 });
    let err = lora.validate(Some(&ModelLimits { max_positions: 48 })).unwrap_err();
    assert!(err.message.ends_with("use a max_seq_len of at most 28 or generate fewer tokens"), "{err}");
}

#[test]
fn precision_is_named_read_back_and_refused_for_full_fine_tuning() {
    let spec = JobSpec::from_toml(&format!("{SPEC}precision = \"bf16\"\n")).unwrap();
    assert_eq!(spec.training.precision, Precision::Bf16);
    spec.validate(None).unwrap();
    assert_eq!(spec.to_json()["training"]["precision"], "bf16");
    let back: JobSpec = serde_json::from_value(spec.to_json()).unwrap();
    assert_eq!(back, spec);
    // fp32 is the default, left out of the stored spec and read back when absent.
    let plain = JobSpec::from_toml(SPEC).unwrap();
    assert_eq!(plain.training.precision, Precision::Fp32);
    assert!(plain.to_json()["training"].get("precision").is_none());

    let err = JobSpec::from_toml(&format!("{SPEC}precision = \"fp8\"\n")).unwrap_err();
    assert!(err.message.contains("unknown precision \"fp8\"; allowed: fp32, bf16, fp16"), "{err}");

    let mut full = with_method("full", "").unwrap();
    full.training.precision = Precision::Fp16;
    let err = full.validate(None).unwrap_err();
    assert_eq!(err.field, "training.precision");
    assert!(err.message.contains("fp16 is not supported for method full"), "{err}");

    // Causal LM on a bf16 or fp16 decoder, but not its full fine-tuning.
    for precision in [Precision::Bf16, Precision::Fp16] {
        let mut causal = with_task("causal_lm", "").unwrap();
        causal.training.precision = precision;
        causal.validate(None).unwrap_or_else(|e| panic!("causal_lm in {precision}: {e}"));
        causal.method = crate::Method::Full;
        causal.peft = Default::default();
        assert_eq!(causal.validate(None).unwrap_err().field, "training.precision");
    }
}

#[test]
fn devices_default_to_one_and_are_bounded_by_the_limit_and_the_batch() {
    let plain = JobSpec::from_toml(SPEC).unwrap();
    assert_eq!(plain.training.devices, 1);
    assert!(plain.to_json()["training"].get("devices").is_none(), "one device is the default, left out");
    let two = JobSpec::from_toml(&format!("{SPEC}devices = 2\n")).unwrap();
    two.validate(None).unwrap();
    assert_eq!(two.to_json()["training"]["devices"], 2);
    let back: JobSpec = serde_json::from_value(two.to_json()).unwrap();
    assert_eq!(back, two);

    let mut none = two.clone();
    none.training.devices = 0;
    let err = none.validate(None).unwrap_err();
    assert_eq!(err.field, "training.devices");
    assert_eq!(err.message, "must be between 1 and 16, got 0");
    let mut wide = two.clone();
    wide.training.batch_size = 4;
    wide.training.devices = 8;
    let err = wide.validate(None).unwrap_err();
    assert_eq!(err.field, "training.devices");
    assert!(err.message.contains("at most training.batch_size (4)"), "{err}");
}
