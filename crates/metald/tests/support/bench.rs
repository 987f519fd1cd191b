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
    let ms = sorted_ms(samples);
    if ms.is_empty() {
        // A row whose runs were turned off (e.g. `BENCH_QEMU_RUNS=0`).
        println!("| {name:<53} | {:>9} | {:>6} | {:>6} |", "-", "-", "-");
        return;
    }
    println!(
        "| {name:<53} | {:>9.1} | {:>6.1} | {:>6.1} |",
        median_of(&ms),
        ms[0],
        ms[ms.len() - 1]
    );
}

/// The median of `samples` in milliseconds (0 for none).
pub fn median_ms(samples: &[Duration]) -> f64 {
    median_of(&sorted_ms(samples))
}

/// The mean of `samples` in milliseconds (0 for none).
pub fn mean_ms(samples: &[Duration]) -> f64 {
    samples.iter().sum::<Duration>().as_secs_f64() * 1000.0 / (samples.len().max(1) as f64)
}

/// The median of `values` (0 for none).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    median_of(&v)
}

/// How far the highest of `values` is above the lowest, in percent of the lowest.
pub fn spread_percent(values: &[f64]) -> f64 {
    let (lo, hi) = values
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    100.0 * (hi - lo) / lo
}

fn sorted_ms(samples: &[Duration]) -> Vec<f64> {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    ms
}

fn median_of(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}
