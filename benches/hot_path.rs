//! Placeholder replaced by the benchmark work (criterion micro-benchmarks of the hit path).
fn main() {}
