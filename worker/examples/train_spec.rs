//! Trains one spec locally, as `ptune-worker train` does:
//! `cargo run --release -p ptune-worker --example train_spec -- SPEC MODEL_DIR OUT_DIR`.

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [spec, model_dir, out_dir] = args.as_slice() else {
        anyhow::bail!("usage: train_spec SPEC MODEL_DIR OUT_DIR");
    };
    let outcome = ptune_worker::local::train_local(spec.as_ref(), model_dir.as_ref(), out_dir.as_ref(), false, 0)?;
    for metric in &outcome.final_metrics {
        println!("{} {} = {:.4} (step {})", metric.kind.as_str(), metric.name, metric.value, metric.step);
    }
    Ok(())
}
