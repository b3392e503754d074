//! The last hour of this process's own job metrics, kept in memory for the
//! dashboard: every few seconds the Prometheus registry is read and the job
//! counters, duration histograms and queue gauges are kept as a sample.
//! Rates and latency percentiles come from the differences between samples;
//! the charts are inline SVG rendered on the server (no script, no CDN).
//!
//! Memory stays flat: samples older than [`DENSE`] are thinned to one per
//! [`COARSE`], so an hour is at most about 150 samples (not 720), and the
//! history stops growing once it spans [`KEEP`].

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

/// How often a sample is taken, and how much history is kept.
pub const EVERY: Duration = Duration::from_secs(5);
pub const KEEP: Duration = Duration::from_secs(3600);
/// Every sample of the most recent `DENSE` is kept (the current rates need a
/// minute of them); older ones are thinned to one per `COARSE`.
pub const DENSE: Duration = Duration::from_secs(120);
pub const COARSE: Duration = Duration::from_secs(30);
/// The window a rate or a percentile is computed over.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Job outcomes that count as failures (the job did not succeed this time).
pub const FAILED: [&str; 2] = ["retried", "dead_lettered"];

#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// `prereg_jobs_total` by (queue, outcome).
    pub jobs: BTreeMap<(String, String), f64>,
    /// `prereg_job_duration_seconds` buckets by queue: (upper bound, cumulative count).
    pub buckets: BTreeMap<String, Vec<(f64, f64)>>,
    /// Gauges by (metric, queue).
    pub gauges: BTreeMap<(String, String), f64>,
}

static HISTORY: Mutex<VecDeque<Sample>> = Mutex::new(VecDeque::new());

fn labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect()
}

/// Parses the Prometheus text exposition of this process into a sample.
pub fn parse(text: &str, at: DateTime<Utc>) -> Sample {
    let mut s = Sample {
        at,
        ..Default::default()
    };
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, l) = match series.split_once('{') {
            Some((n, rest)) => (n, labels(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        let queue = l.get("queue").cloned().unwrap_or_default();
        match name {
            "prereg_jobs_total" => {
                let outcome = l.get("outcome").cloned().unwrap_or_default();
                *s.jobs.entry((queue, outcome)).or_default() += value;
            }
            "prereg_job_duration_seconds_bucket" => {
                let le = match l.get("le").map(String::as_str) {
                    Some("+Inf") => f64::INFINITY,
                    Some(v) => v.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                s.buckets.entry(queue).or_default().push((le, value));
            }
            "prereg_queue_depth"
            | "prereg_queue_oldest_message_age_seconds"
            | "prereg_jobs_in_flight"
            | "prereg_dead_letters"
            | "prereg_queue_consumers" => {
                s.gauges.insert((name.to_string(), queue), value);
            }
            _ => {}
        }
    }
    for b in s.buckets.values_mut() {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    s
}

/// Takes a sample now and drops what is older than an hour.
pub fn sample_now() {
    let s = parse(&crate::telemetry::metrics().render(), Utc::now());
    record(s);
}

pub fn record(s: Sample) {
    if let Ok(mut h) = HISTORY.lock() {
        // Several samplers in one process (tests run many apps): one sample
        // per period is enough.
        let half = chrono::Duration::from_std(EVERY / 2).unwrap_or_default();
        if h.back().is_some_and(|b| s.at - b.at < half) {
            return;
        }
        h.push_back(s);
        thin(&mut h);
    }
}

/// Drops samples older than [`KEEP`], and keeps one per [`COARSE`] among
/// those older than [`DENSE`].
fn thin(h: &mut VecDeque<Sample>) {
    let Some(now) = h.back().map(|b| b.at) else {
        return;
    };
    let span = |d: Duration| chrono::Duration::from_std(d).unwrap_or_default();
    let (keep, dense, coarse) = (span(KEEP), span(DENSE), span(COARSE));
    while h.front().is_some_and(|f| now - f.at > keep) {
        h.pop_front();
    }
    let mut last_kept: Option<DateTime<Utc>> = None;
    h.retain(|x| {
        let old = now - x.at > dense;
        let keep = !old || last_kept.is_none_or(|k| x.at - k >= coarse);
        if keep {
            last_kept = Some(x.at);
        }
        keep
    });
}

pub fn history() -> Vec<Sample> {
    HISTORY
        .lock()
        .map(|h| h.iter().cloned().collect())
        .unwrap_or_default()
}

/// Samples every [`EVERY`] until cancelled.
pub async fn run(cancel: CancellationToken) {
    loop {
        sample_now();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

fn seconds(a: &Sample, b: &Sample) -> f64 {
    ((b.at - a.at).num_milliseconds() as f64 / 1000.0).max(0.001)
}

/// Jobs of `queue` done between two samples: (processed, failed, dead-lettered).
pub fn counts(a: &Sample, b: &Sample, queue: &str) -> (f64, f64, f64) {
    let (mut all, mut failed, mut dead) = (0.0, 0.0, 0.0);
    for ((q, outcome), v) in &b.jobs {
        if q != queue {
            continue;
        }
        let d = (v - a
            .jobs
            .get(&(q.clone(), outcome.clone()))
            .copied()
            .unwrap_or(0.0))
        .max(0.0);
        all += d;
        if FAILED.contains(&outcome.as_str()) {
            failed += d;
        }
        if outcome == "dead_lettered" {
            dead += d;
        }
    }
    (all, failed, dead)
}

/// Jobs per second of `queue` between two samples: (processed, failed, acked).
pub fn rates(a: &Sample, b: &Sample, queue: &str) -> (f64, f64, f64) {
    let dt = seconds(a, b);
    let (all, failed, dead) = counts(a, b, queue);
    (all / dt, failed / dt, (all - dead) / dt)
}

/// The latency quantile `q` (0..1) of the jobs finished between two samples,
/// over `queues` (interpolated within the histogram bucket), if any finished.
pub fn quantile(a: &Sample, b: &Sample, queues: &[&str], q: f64) -> Option<f64> {
    let mut merged: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (queue, buckets) in &b.buckets {
        if !queues.is_empty() && !queues.contains(&queue.as_str()) {
            continue;
        }
        let before = a.buckets.get(queue);
        for (le, count) in buckets {
            let prev = before
                .and_then(|bb| bb.iter().find(|(l, _)| l == le))
                .map(|(_, c)| *c)
                .unwrap_or(0.0);
            let e = merged.entry(le.to_bits()).or_insert((*le, 0.0));
            e.1 += (count - prev).max(0.0);
        }
    }
    let mut buckets: Vec<(f64, f64)> = merged.into_values().collect();
    buckets.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let inside = (count - below).max(f64::MIN_POSITIVE);
            return Some(lo + (le - lo) * ((rank - below) / inside).clamp(0.0, 1.0));
        }
        lo = le;
        below = count;
    }
    Some(lo)
}

/// One line of a chart.
pub struct Series {
    pub name: String,
    pub points: Vec<(DateTime<Utc>, f64)>,
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One point per sample over the history, each from the difference with
/// the latest sample at least `window` earlier (or the first one).
pub fn points(
    h: &[Sample],
    window: Duration,
    f: impl Fn(&Sample, &Sample) -> Option<f64>,
) -> Vec<(DateTime<Utc>, f64)> {
    let window = chrono::Duration::from_std(window).unwrap_or_default();
    (1..h.len())
        .filter_map(|i| {
            let a = h[..i]
                .iter()
                .rev()
                .find(|a| h[i].at - a.at >= window)
                .unwrap_or(&h[0]);
            f(a, &h[i]).map(|v| (h[i].at, v))
        })
        .collect()
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else if v == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

/// An inline SVG line chart over the last hour (x: time, y: from 0).
pub fn svg_chart(
    id: &str,
    title: &str,
    unit: &str,
    series: &[Series],
    now: DateTime<Utc>,
) -> String {
    let (w, h, left, right, top, bottom) = (560.0, 190.0, 48.0, 8.0, 36.0, 22.0);
    let span = KEEP.as_secs_f64();
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0_f64, f64::max);
    let ymax = if max <= 0.0 { 1.0 } else { max * 1.1 };
    let x = |t: DateTime<Utc>| {
        let ago = ((now - t).num_milliseconds() as f64 / 1000.0).clamp(0.0, span);
        left + (w - left - right) * (1.0 - ago / span)
    };
    let y = |v: f64| top + (h - top - bottom) * (1.0 - v / ymax);
    let mut out = format!(
        r##"<svg id="{id}" class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{title}">"##
    );
    out.push_str(&format!(
        r##"<text x="{left}" y="14" font-size="12" font-weight="bold">{title} ({unit})</text>"##
    ));
    for frac in [0.0, 0.5, 1.0] {
        let yy = y(ymax * frac);
        out.push_str(&format!(
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#e3e3e8"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            w - right,
            left - 4.0,
            yy + 3.0,
            fmt_value(ymax * frac)
        ));
    }
    for (label, ago) in [("-60 min", span), ("-30 min", span / 2.0), ("now", 0.0)] {
        let xx = left + (w - left - right) * (1.0 - ago / span);
        out.push_str(&format!(
            r##"<text x="{xx:.1}" y="{}" font-size="10" text-anchor="middle">{label}</text>"##,
            h - 6.0
        ));
    }
    let mut legend_x = left;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        if s.points.len() > 1 {
            let pts: Vec<String> = s
                .points
                .iter()
                .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
                .collect();
            out.push_str(&format!(
                r##"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"##,
                pts.join(" ")
            ));
        }
        out.push_str(&format!(
            r##"<rect x="{legend_x:.0}" y="20" width="8" height="8" fill="{color}"/><text x="{:.0}" y="28" font-size="10">{}</text>"##,
            legend_x + 11.0,
            s.name
        ));
        legend_x += 14.0 + 6.5 * s.name.len() as f64;
    }
    if series.iter().all(|s| s.points.is_empty()) {
        out.push_str(&format!(
            r##"<text x="{:.0}" y="{:.0}" font-size="11" fill="#888" text-anchor="middle">no jobs in the last hour</text>"##,
            (w + left) / 2.0,
            h / 2.0
        ));
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT_A: &str = "# TYPE prereg_jobs_total counter
prereg_jobs_total{queue=\"email\",outcome=\"done\"} 10
prereg_jobs_total{queue=\"email\",outcome=\"retried\"} 1
prereg_job_duration_seconds_bucket{queue=\"email\",le=\"0.1\"} 5
prereg_job_duration_seconds_bucket{queue=\"email\",le=\"1\"} 11
prereg_job_duration_seconds_bucket{queue=\"email\",le=\"+Inf\"} 11
prereg_queue_depth{queue=\"email\"} 3
";
    const TEXT_B: &str = "prereg_jobs_total{queue=\"email\",outcome=\"done\"} 30
prereg_jobs_total{queue=\"email\",outcome=\"retried\"} 6
prereg_jobs_total{queue=\"email\",outcome=\"dead_lettered\"} 2
prereg_job_duration_seconds_bucket{queue=\"email\",le=\"0.1\"} 25
prereg_job_duration_seconds_bucket{queue=\"email\",le=\"1\"} 36
prereg_job_duration_seconds_bucket{queue=\"email\",le=\"+Inf\"} 38
";

    #[test]
    fn rates_and_percentiles_from_two_samples() {
        let t0: DateTime<Utc> = "2026-11-22T00:00:00Z".parse().unwrap();
        let a = parse(TEXT_A, t0);
        let b = parse(TEXT_B, t0 + chrono::Duration::seconds(10));
        assert_eq!(
            a.gauges[&("prereg_queue_depth".into(), "email".into())],
            3.0
        );
        let (all, failed, acked) = rates(&a, &b, "email");
        assert!((all - 2.7).abs() < 1e-9, "{all}");
        assert!((failed - 0.7).abs() < 1e-9, "{failed}");
        assert!((acked - 2.5).abs() < 1e-9, "{acked}");
        // 27 finished: 20 within 0.1 s, 5 more within 1 s, 2 slower.
        let p50 = quantile(&a, &b, &["email"], 0.5).unwrap();
        assert!(p50 > 0.0 && p50 <= 0.1, "{p50}");
        let p90 = quantile(&a, &b, &["email"], 0.9).unwrap();
        assert!(p90 > 0.1 && p90 <= 1.0, "{p90}");
        assert_eq!(quantile(&a, &b, &["export"], 0.5), None);
    }

    #[test]
    fn three_hours_of_samples_keep_a_bounded_thinned_hour() {
        let t0: DateTime<Utc> = "2026-11-22T00:00:00Z".parse().unwrap();
        let mut h = VecDeque::new();
        let mut most = 0;
        for i in 0..(3 * 3600 / 5) {
            h.push_back(Sample {
                at: t0 + chrono::Duration::seconds(5 * i),
                ..Default::default()
            });
            thin(&mut h);
            most = most.max(h.len());
        }
        // An hour: 2 minutes dense (24 + 1) plus one per 30 s for 58 minutes.
        assert!(most <= 25 + 117, "{most} samples kept");
        let now = h.back().unwrap().at;
        assert!(now - h.front().unwrap().at <= chrono::Duration::hours(1));
        assert!(now - h.front().unwrap().at >= chrono::Duration::minutes(59));
        // Rates over a minute stay computable at every point: the sample a
        // minute before each one exists (dense) or is at most 30 s off.
        let v: Vec<Sample> = h.into_iter().collect();
        let pts = points(&v, RATE_WINDOW, |a, b| {
            Some((b.at - a.at).num_seconds() as f64)
        });
        let first = v[0].at;
        let later: Vec<&(DateTime<Utc>, f64)> = pts
            .iter()
            .filter(|p| p.0 - first >= chrono::Duration::seconds(90))
            .collect();
        assert!(later.len() > 100);
        assert!(
            later.iter().all(|p| (60.0..=90.0).contains(&p.1)),
            "{later:?}"
        );
    }

    #[test]
    fn chart_is_self_contained_svg() {
        let now = Utc::now();
        let s = Series {
            name: "email".into(),
            points: vec![(now - chrono::Duration::minutes(5), 1.0), (now, 2.0)],
        };
        let svg = svg_chart("c", "Processed", "jobs/s", &[s], now);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("<polyline"));
        assert!(!svg.contains("http://") || svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
    }
}
