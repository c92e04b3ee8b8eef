//! What the benchmarks that time single calls share.
#![allow(dead_code)]

use std::time::Instant;

/// Percentiles of one read, in milliseconds.
pub struct Stats {
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

/// Times `rounds` calls of `call` after one warm-up call.
pub async fn time<F, Fut>(rounds: usize, mut call: F) -> anyhow::Result<Stats>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    call().await?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        call().await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok(Stats { p50: at(0.5), p95: at(0.95), max: at(1.0) })
}
