//! Histogram samples recorded in a process that nobody scrapes are folded
//! into their buckets by the recorder's upkeep instead of piling up. A test
//! binary of its own: it measures this process's resident memory.

use std::time::Duration;

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

#[test]
fn histogram_samples_do_not_pile_up_in_a_process_nobody_scrapes() {
    let _handle = prereg::telemetry::metrics();
    // Warm up (the histogram's first blocks, the allocator's arenas).
    for i in 0..100_000u32 {
        metrics::histogram!("prereg_test_upkeep_seconds").record(f64::from(i % 100) / 1e3);
    }
    std::thread::sleep(prereg::telemetry::UPKEEP_EVERY * 2);
    let before = rss();
    let mut peak = before;
    const ROUNDS: u32 = 6;
    const PER_ROUND: u32 = 500_000;
    for _ in 0..ROUNDS {
        for i in 0..PER_ROUND {
            metrics::histogram!("prereg_test_upkeep_seconds").record(f64::from(i % 100) / 1e3);
        }
        std::thread::sleep(prereg::telemetry::UPKEEP_EVERY * 2 + Duration::from_millis(200));
        peak = peak.max(rss());
    }
    // Kept raw, 3,000,000 samples take more than 24 MB (8 bytes each plus
    // their blocks); folded every round, about one round's worth at most.
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 12 << 20,
        "resident memory grew by {} KiB over {} samples nobody scraped",
        grown >> 10,
        ROUNDS * PER_ROUND
    );
}
