//! `ptune`: submit and manage PEFT training jobs on a ptune coordinator.

use clap::Parser;

use ptune_cli::{run, Cli};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            2
        }
    };
    std::process::exit(code);
}
