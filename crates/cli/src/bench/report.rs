//! What `bench serve` measured, as vLLM's `bench serve` reports it: throughput, goodput and
//! latency percentiles (JSON with vLLM's key names where they exist, a table, SVG plots), and
//! `bench compare` over several runs.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One request as the client saw it (seconds).
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// When it was sent, from the start of the run.
    pub start: f64,
    pub input_len: usize,
    pub output_len: usize,
    pub ttft: f64,
    pub itl: Vec<f64>,
    pub e2el: f64,
    pub error: Option<String>,
}

impl Outcome {
    /// Time per output token after the first.
    fn tpot(&self) -> Option<f64> {
        (self.output_len > 1).then(|| (self.e2el - self.ttft) / (self.output_len - 1) as f64)
    }
}

/// `ttft:500 tpot:50 e2el:5000` (milliseconds).
pub fn parse_goodput(args: &[String]) -> Result<BTreeMap<String, f64>> {
    let mut slos = BTreeMap::new();
    for a in args {
        let (k, v) = a.split_once(':').with_context(|| format!("--goodput takes METRIC:MS, not `{a}`"))?;
        if !matches!(k, "ttft" | "tpot" | "e2el") {
            bail!("--goodput: `{k}` is not ttft, tpot or e2el");
        }
        let ms: f64 = v.parse().ok().filter(|x: &f64| *x > 0.0).with_context(|| format!("--goodput {k}: `{v}` is not a positive number of ms"))?;
        slos.insert(k.to_string(), ms);
    }
    Ok(slos)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Linear interpolation between closest ranks (numpy's default).
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// `mean_X_ms`, `median_X_ms`, `std_X_ms`, `p90_X_ms`, `p99_X_ms` of values in seconds.
fn stats(out: &mut Map<String, Value>, name: &str, values: &[f64]) {
    let mut v: Vec<f64> = values.iter().map(|x| x * 1e3).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    out.insert(format!("mean_{name}_ms"), json!(mean));
    out.insert(format!("median_{name}_ms"), json!(percentile(&v, 50.0)));
    out.insert(format!("std_{name}_ms"), json!(std));
    out.insert(format!("p90_{name}_ms"), json!(percentile(&v, 90.0)));
    out.insert(format!("p99_{name}_ms"), json!(percentile(&v, 99.0)));
}

pub fn summarize(config: Value, outcomes: &[Outcome], duration: f64, slos: &BTreeMap<String, f64>) -> Value {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for o in outcomes {
        if let Some(e) = &o.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
    }
    let input: usize = ok.iter().map(|o| o.input_len).sum();
    let output: usize = ok.iter().map(|o| o.output_len).sum();
    let good = ok
        .iter()
        .filter(|o| {
            slos.iter().all(|(k, ms)| {
                let v = match k.as_str() {
                    "ttft" => o.ttft,
                    "tpot" => o.tpot().unwrap_or(0.0),
                    _ => o.e2el,
                };
                v * 1e3 <= *ms
            })
        })
        .count();
    let mut r = match config {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let d = duration.max(1e-9);
    r.insert("duration".into(), json!(duration));
    r.insert("completed".into(), json!(ok.len()));
    r.insert("failed".into(), json!(outcomes.len() - ok.len()));
    r.insert("total_input_tokens".into(), json!(input));
    r.insert("total_output_tokens".into(), json!(output));
    r.insert("request_throughput".into(), json!(ok.len() as f64 / d));
    r.insert("request_goodput".into(), if slos.is_empty() { Value::Null } else { json!(good as f64 / d) });
    r.insert("goodput_slos_ms".into(), json!(slos));
    r.insert("output_throughput".into(), json!(output as f64 / d));
    r.insert("total_token_throughput".into(), json!((input + output) as f64 / d));
    let ttfts: Vec<f64> = ok.iter().map(|o| o.ttft).collect();
    let tpots: Vec<f64> = ok.iter().filter_map(|o| o.tpot()).collect();
    let itls: Vec<f64> = ok.iter().flat_map(|o| o.itl.iter().copied()).collect();
    let e2els: Vec<f64> = ok.iter().map(|o| o.e2el).collect();
    stats(&mut r, "ttft", &ttfts);
    stats(&mut r, "tpot", &tpots);
    stats(&mut r, "itl", &itls);
    stats(&mut r, "e2el", &e2els);
    r.insert("errors".into(), json!(errors));
    r.insert("input_lens".into(), json!(ok.iter().map(|o| o.input_len).collect::<Vec<_>>()));
    r.insert("output_lens".into(), json!(ok.iter().map(|o| o.output_len).collect::<Vec<_>>()));
    r.insert("ttfts".into(), json!(ttfts));
    r.insert("tpots".into(), json!(tpots));
    r.insert("itls".into(), json!(itls));
    r.insert("e2els".into(), json!(e2els));
    r.insert("send_times".into(), json!(outcomes.iter().map(|o| o.start).collect::<Vec<_>>()));
    Value::Object(r)
}

const ROWS: &[(&str, &str)] = &[
    ("completed", "Successful requests"),
    ("failed", "Failed requests"),
    ("duration", "Benchmark duration (s)"),
    ("total_input_tokens", "Total input tokens"),
    ("total_output_tokens", "Total generated tokens"),
    ("request_throughput", "Request throughput (req/s)"),
    ("request_goodput", "Request goodput (req/s)"),
    ("output_throughput", "Output token throughput (tok/s)"),
    ("total_token_throughput", "Total token throughput (tok/s)"),
    ("mean_ttft_ms", "Mean TTFT (ms)"),
    ("median_ttft_ms", "Median TTFT (ms)"),
    ("p90_ttft_ms", "P90 TTFT (ms)"),
    ("p99_ttft_ms", "P99 TTFT (ms)"),
    ("mean_tpot_ms", "Mean TPOT (ms)"),
    ("median_tpot_ms", "Median TPOT (ms)"),
    ("p90_tpot_ms", "P90 TPOT (ms)"),
    ("p99_tpot_ms", "P99 TPOT (ms)"),
    ("mean_itl_ms", "Mean ITL (ms)"),
    ("median_itl_ms", "Median ITL (ms)"),
    ("p90_itl_ms", "P90 ITL (ms)"),
    ("p99_itl_ms", "P99 ITL (ms)"),
    ("mean_e2el_ms", "Mean E2EL (ms)"),
    ("median_e2el_ms", "Median E2EL (ms)"),
    ("p90_e2el_ms", "P90 E2EL (ms)"),
    ("p99_e2el_ms", "P99 E2EL (ms)"),
];

fn shown(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e12 => format!("{f:.0}"),
        Some(f) => format!("{f:.2}"),
        None => "-".into(),
    }
}

pub fn print(r: &Value) {
    println!("{:=^56}", format!(" Serving Benchmark: {} ", r["label"].as_str().unwrap_or("")));
    for (key, name) in ROWS {
        if r[*key].is_null() {
            continue;
        }
        println!("{name:<40} {:>15}", shown(&r[*key]));
    }
    if let Some(errors) = r["errors"].as_object().filter(|e| !e.is_empty()) {
        println!("Errors:");
        for (msg, n) in errors {
            println!("  {n:>5} x {msg}");
        }
    }
    println!("{}", "=".repeat(56));
}

#[derive(Args)]
pub struct CompareArgs {
    /// JSON files written by `bench serve --output-json`.
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Plot their latency distributions together (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let runs: Vec<Value> = a
        .runs
        .iter()
        .map(|p| -> Result<Value> {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?).with_context(|| format!("{} is not JSON", p.display()))?;
            if v["completed"].is_null() {
                bail!("{} is not a `bench serve` result", p.display());
            }
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let names: Vec<String> = runs.iter().zip(&a.runs).map(|(r, p)| r["label"].as_str().map(str::to_string).unwrap_or_else(|| p.display().to_string())).collect();
    print!("{:<34}", "metric");
    for (i, n) in names.iter().enumerate() {
        let n: String = n.chars().take(22).collect();
        if i == 0 {
            print!(" {n:>22}");
        } else {
            print!(" {n:>22} {:>7}", "ratio");
        }
    }
    println!();
    for (key, name) in ROWS {
        if runs.iter().all(|r| r[*key].is_null()) {
            continue;
        }
        print!("{:<34}", name.chars().take(34).collect::<String>());
        let base = runs[0][*key].as_f64();
        for (i, r) in runs.iter().enumerate() {
            print!(" {:>22}", shown(&r[*key]));
            if i > 0 {
                let ratio = match (r[*key].as_f64(), base) {
                    (Some(v), Some(b)) if b != 0.0 => format!("{:.2}x", v / b),
                    _ => "-".into(),
                };
                print!(" {ratio:>7}");
            }
        }
        println!();
    }
    if let Some(path) = &a.plot {
        plot(&runs, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Cumulative distributions of TTFT, TPOT, ITL and E2EL, one curve per run (SVG).
pub fn plot(runs: &[Value], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 2));
    let colors = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];
    for (panel, (key, title)) in panels.iter().zip([("ttfts", "time to first token (ms)"), ("tpots", "time per output token (ms)"), ("itls", "inter-token latency (ms)"), ("e2els", "end-to-end latency (ms)")]) {
        let series: Vec<Vec<f64>> = runs
            .iter()
            .map(|r| {
                let mut v: Vec<f64> = r[key].as_array().map(|a| a.iter().filter_map(Value::as_f64).map(|x| x * 1e3).collect()).unwrap_or_default();
                v.sort_by(f64::total_cmp);
                v
            })
            .collect();
        let max = series.iter().flat_map(|s| s.last().copied()).fold(1e-3, f64::max) * 1.05;
        let mut chart = ChartBuilder::on(panel).caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(36).y_label_area_size(48).build_cartesian_2d(0.0..max, 0.0..1.0)?;
        chart.configure_mesh().x_desc("ms").y_desc("fraction of requests").draw()?;
        for (i, (s, r)) in series.iter().zip(runs).enumerate() {
            let color = colors[i % colors.len()];
            let n = s.len().max(1) as f64;
            let points = s.iter().enumerate().map(|(j, &x)| (x, (j + 1) as f64 / n));
            let label = r["label"].as_str().unwrap_or("run").to_string();
            chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(SeriesLabelPosition::LowerRight).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ttft: f64, e2el: f64, out: usize) -> Outcome {
        Outcome { ttft, e2el, output_len: out, input_len: 10, itl: vec![(e2el - ttft) / (out - 1) as f64; out - 1], ..Default::default() }
    }

    #[test]
    fn summary_uses_vllm_keys_and_counts_goodput() {
        let outs = vec![outcome(0.1, 1.1, 11), outcome(0.3, 2.3, 11), Outcome { error: Some("HTTP 400: too long".into()), ..Default::default() }];
        let slos = parse_goodput(&["ttft:200".into(), "tpot:150".into()]).unwrap();
        let r = summarize(json!({"label": "t"}), &outs, 2.0, &slos);
        assert_eq!((r["completed"].as_u64(), r["failed"].as_u64()), (Some(2), Some(1)));
        assert_eq!(r["total_output_tokens"], 22);
        assert!((r["request_goodput"].as_f64().unwrap() - 0.5).abs() < 1e-9, "one of two meets both SLOs");
        assert!((r["mean_ttft_ms"].as_f64().unwrap() - 200.0).abs() < 1e-9);
        assert!((r["median_tpot_ms"].as_f64().unwrap() - 150.0).abs() < 1e-9, "(1 s / 10 + 2 s / 10) / 2");
        assert!((r["p99_e2el_ms"].as_f64().unwrap() - 2288.0).abs() < 1e-6);
        assert_eq!(r["errors"]["HTTP 400: too long"], 1);
        assert!(parse_goodput(&["latency:5".into()]).is_err() && parse_goodput(&["ttft:-1".into()]).is_err());
    }
}
