//! Benchmark tables.

use std::time::Duration;

/// A bench setting from the environment: `name` parsed, or `default` when unset or unparsable.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Prints one benchmark table row: median, min and max in milliseconds.
pub fn row(name: &str, samples: &[Duration]) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        // A row whose runs were turned off (e.g. `BENCH_QEMU_RUNS=0`).
        println!("| {name:<53} | {:>9} | {:>6} | {:>6} |", "-", "-", "-");
        return;
    }
    let median = if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    println!(
        "| {name:<53} | {median:>9.1} | {:>6.1} | {:>6.1} |",
        ms[0],
        ms[ms.len() - 1]
    );
}
